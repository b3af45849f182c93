"""Hugging Face ids as students and teachers (issue #34 item 1), offline: a cache laid out here the way
huggingface_hub lays it out, read by huggingface_hub itself in a fresh process with HF_HOME and
HF_HUB_OFFLINE set, as a user's shell would."""

import json
import shutil
import subprocess
import sys

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out_cache(home, model_dir, repo="acme/tiny-encoder"):
    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model_dir, root / "snapshots" / COMMIT)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)


def run(code, home):
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False)


def test_a_hub_id_and_revision_load_from_the_cache_and_a_missing_one_is_named(tmp_path, tiny_model_dir):
    lay_out_cache(tmp_path / "hf", tiny_model_dir)
    (tmp_path / "card").mkdir()
    done = run(f"""
from optical_ray.encoder import Encoder
from optical_ray.model_store import model_revision
a = Encoder.load("acme/tiny-encoder").encode(["a dog"])
b = Encoder.load("acme/tiny-encoder@{COMMIT}").encode(["a dog"])
c = Encoder.load({str(tiny_model_dir)!r}).encode(["a dog"])
assert (a == b).all() and (a == c).all()
from optical_ray.card import write_model_card
from optical_ray.config import DistillConfig, load_config
card = write_model_card({str(tmp_path / "card")!r}, load_config(DistillConfig, {{"student": "acme/tiny-encoder"}}), {{}})
print(card.read_text())
print(model_revision("acme/tiny-encoder"))
""", tmp_path / "hf")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith(COMMIT)
    assert f"base_model: acme/tiny-encoder\nbase_model_revision: {COMMIT}" in done.stdout

    # A Ray Train run records the commits its models resolved to; when `main` moves on the hub, resuming
    # the run with the bare id is refused, naming the pinned commit.
    claim = f"""
from optical_ray import checkpoints
from optical_ray.config import DistillConfig, load_config
checkpoints.claim({str(tmp_path / "run")!r}, load_config(DistillConfig, {{"student": "acme/tiny-encoder"}}))
"""
    assert run(claim, tmp_path / "hf").returncode == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["model_revisions"] == {"student": COMMIT}
    moved = "f" * 40
    shutil.copytree(tmp_path / "hf" / "hub" / "models--acme--tiny-encoder" / "snapshots" / COMMIT,
                    tmp_path / "hf" / "hub" / "models--acme--tiny-encoder" / "snapshots" / moved)
    (tmp_path / "hf" / "hub" / "models--acme--tiny-encoder" / "refs" / "main").write_text(moved)
    refused = run(claim, tmp_path / "hf")
    assert refused.returncode == 1
    assert f"started with student acme/tiny-encoder at revision {COMMIT}; it resolves to {moved} now" in refused.stderr
    assert f"student=acme/tiny-encoder@{COMMIT}" in refused.stderr

    missing = run("from optical_ray.cli import main; raise SystemExit(main(['eval', '--model', 'acme/missing', "
                  "'--bitext-english', 'x', '--out', 'o']))", tmp_path / "hf")
    assert missing.returncode == 2
    assert "model 'acme/missing'" in missing.stderr and str(tmp_path / "hf" / "hub") in missing.stderr
    assert "HF_HUB_OFFLINE is set" in missing.stderr and "Traceback" not in missing.stderr
