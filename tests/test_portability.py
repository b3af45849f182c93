"""Saved students load elsewhere with the pooling they were trained with (issue #34 item 4): under
transformers 4 with sentence-transformers 3, and in infinity-emb (an embedding server pinned to them), as
well as under the versions installed here (test_models, test_pooling). Those libraries are pip-installed
into a folder of their own and put ahead of this environment's in a fresh process; torch and the rest
are shared."""

import json
import subprocess
import sys

import numpy as np
import pytest

from optical_ray.config import DistillConfig, load_config
from optical_ray.distill import distill
from optical_ray.encoder import Encoder

OLD_STACK = ["transformers>=4.50,<5", "sentence-transformers>=3.0.1,<4", "huggingface_hub>=0.32,<1.0",
             "tokenizers>=0.21,<0.23", "infinity-emb==0.0.78"]
TEXTS = ["Ein Hund rennt über eine Wiese.", "A child plays in the sand.", "Allqu pampapi phawan."]


@pytest.fixture(scope="module")
def old_stack(tmp_path_factory):
    target = tmp_path_factory.mktemp("transformers4")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                           *OLD_STACK], capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        pytest.skip(f"could not install {' '.join(OLD_STACK)} from the package index: {done.stderr[-300:]}")
    return target


def load_under(stack, folders: dict[str, tuple[str, str | None]]) -> dict:
    """Per name, SentenceTransformer's embeddings of its (folder, prompt), AutoModel's loading report and
    infinity-emb's embeddings (it sends no prompt), under ``stack``, in one fresh process."""
    code = f"""
import asyncio, json, transformers
from infinity_emb import AsyncEmbeddingEngine, EngineArgs
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer
assert transformers.__version__.startswith("4."), transformers.__version__

async def infinity(folder):
    engine = AsyncEmbeddingEngine.from_args(EngineArgs(model_name_or_path=folder, engine="torch", device="cpu",
                                                       bettertransformer=False, model_warmup=False))
    async with engine:
        return (await engine.embed(sentences={TEXTS!r}))[0]

out = {{}}
for name, (folder, prompt) in {folders!r}.items():
    emb = SentenceTransformer(folder, device="cpu").encode({TEXTS!r}, prompt_name=prompt)
    _, loading = AutoModel.from_pretrained(folder, output_loading_info=True)
    AutoTokenizer.from_pretrained(folder)
    out[name] = {{"emb": emb.tolist(), "loading": {{k: list(v) for k, v in loading.items()}},
                 "infinity": [list(map(float, v)) for v in asyncio.run(infinity(folder))]}}
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(stack), "PATH": "/usr/bin:/bin",
                                                             "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_saved_students_load_under_transformers_4_and_in_infinity_emb(old_stack, tmp_path, tiny_model_dir, cls_teacher_dir):
    """A mean-pooled E5-style student (prompts), saved as distill saves it, and a CLS-pooled one with a
    Dense layer distilled from a teacher of another width (its map into the teacher's space is dropped
    at save)."""
    cfg = load_config(DistillConfig, {"student": str(cls_teacher_dir), "teacher": str(tiny_model_dir), "steps": 2,
                                      "batch_size": 8, "max_length": 32, "eval_every": 0,
                                      "data": {"dev_languages": ["de"]}, "output_dir": str(tmp_path / "run")})
    folders = {"mean": Encoder.load(tiny_model_dir).save(tmp_path / "student"), "cls_dense": distill(cfg, progress=False).model_dir}
    ours = {name: Encoder.load(folder) for name, folder in folders.items()}
    prompts = {name: "query" if encoder.prompts else None for name, encoder in ours.items()}
    loaded = load_under(old_stack, {name: (str(folder), prompts[name]) for name, folder in folders.items()})
    for name, encoder in ours.items():
        assert not any(loaded[name]["loading"].values()), (name, loaded[name]["loading"])  # no missing/unexpected weights
        np.testing.assert_allclose(np.array(loaded[name]["emb"]), encoder.encode(TEXTS, prompts[name]), atol=1e-5,
                                   err_msg=name)
        np.testing.assert_allclose(np.array(loaded[name]["infinity"]), encoder.encode(TEXTS), atol=1e-5, err_msg=name)
    assert prompts == {"mean": "query", "cls_dense": None} and np.array(loaded["cls_dense"]["emb"]).shape[1] == 16
    # Its model card says how it embeds, as its folder states it.
    assert "CLS-pooled, Dense-projected, L2-normalised embeddings; no prompts" in (folders["cls_dense"] / "README.md").read_text()
