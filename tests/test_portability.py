"""Saved students load elsewhere with the pooling they were trained with (issue #34 item 4): under
transformers 4 and sentence-transformers 4 -- what servers pinned to them (infinity-emb, older
text-embeddings stacks) load through -- as well as under the versions installed here (test_models,
test_pooling). Those older libraries are pip-installed into a folder of their own and put ahead of this
environment's in a fresh process; torch and the rest are shared."""

import json
import subprocess
import sys

import numpy as np
import pytest

from optical_ray.config import DistillConfig, load_config
from optical_ray.distill import distill
from optical_ray.encoder import Encoder

OLD_STACK = ["transformers>=4.50,<5", "sentence-transformers>=4,<5", "huggingface_hub>=0.30,<1.0", "tokenizers>=0.21,<0.23"]
TEXTS = ["Ein Hund rennt über eine Wiese.", "A child plays in the sand.", "Allqu pampapi phawan."]


@pytest.fixture(scope="module")
def old_stack(tmp_path_factory):
    target = tmp_path_factory.mktemp("transformers4")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                           *OLD_STACK], capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        pytest.skip(f"could not install {' '.join(OLD_STACK)} from the package index: {done.stderr[-300:]}")
    return target


def load_under(stack, folder, prompt):
    """SentenceTransformer's embeddings and AutoModel's loading report for ``folder`` under ``stack``."""
    code = f"""
import json, transformers, sentence_transformers
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer
assert transformers.__version__.startswith("4."), transformers.__version__
emb = SentenceTransformer({str(folder)!r}, device="cpu").encode({TEXTS!r}, prompt_name={prompt!r})
_, loading = AutoModel.from_pretrained({str(folder)!r}, output_loading_info=True)
AutoTokenizer.from_pretrained({str(folder)!r})
print(json.dumps({{"emb": emb.tolist(), "loading": {{k: list(v) for k, v in loading.items()}}}}))
"""
    done = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(stack), "PATH": "/usr/bin:/bin",
                                                             "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("start", ["mean", "cls_dense"])
def test_a_distilled_student_loads_under_transformers_4(old_stack, tmp_path, tiny_model_dir, tiny_teacher_dir,
                                                        cls_teacher_dir, start):
    """A mean-pooled E5-style student (prompts), and a CLS-pooled one with a Dense layer distilled from a
    teacher of another width (its projection into the teacher's space is dropped at save)."""
    student, teacher = (tiny_model_dir, tiny_teacher_dir) if start == "mean" else (cls_teacher_dir, tiny_model_dir)
    cfg = load_config(DistillConfig, {"student": str(student), "teacher": str(teacher), "steps": 2, "batch_size": 8,
                                      "max_length": 32, "eval_every": 0, "output_dir": str(tmp_path / "run")})
    folder = distill(cfg, progress=False).model_dir
    ours = Encoder.load(folder)
    prompt = "query" if ours.prompts else None
    loaded = load_under(old_stack, folder, prompt)
    assert not any(loaded["loading"].values()), loaded["loading"]  # no missing, unexpected or mismatched weights
    np.testing.assert_allclose(np.array(loaded["emb"]), ours.encode(TEXTS, prompt), atol=1e-5)
    assert np.array(loaded["emb"]).shape[1] == (16 if start == "cls_dense" else ours.dim)
