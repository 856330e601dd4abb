"""The three teacher modes give the student exactly the teacher's outputs for its own samples (and views)."""

import pytest
import torch

from raydistill.augment import make_augment
from raydistill.cache import CacheError, build_cache, cache_fingerprint, check_cache
from raydistill.checkpoints import build_from_spec, model_spec
from raydistill.config import ScaleConfig
from raydistill.data import fingerprint, load_splits, shard_indices
from raydistill.teacher import CachedTeacher, InprocessTeacher, LiveTeacher, start_teacher_server

pytestmark = pytest.mark.ray

SPEC = model_spec("cnn", {"widths": [8, 16], "hidden": 32}, 10, (1, 8, 8))


@pytest.fixture(scope="module")
def setup(ray_local, tmp_path_factory):
    torch.manual_seed(0)
    teacher = build_from_spec(SPEC).eval()
    state = teacher.state_dict()
    splits = load_splits("digits", limit=120)
    data_fp = fingerprint(splits)
    shard = shard_indices(splits.train.y, 2, 1, "random", seed=0)  # rank 1 of 2: a real subset
    x = torch.from_numpy(splits.train.x[shard])
    with torch.inference_mode():
        expected = teacher(x)  # (N, K): what the teacher says for this shard's samples
    root = tmp_path_factory.mktemp("cache")
    caches = {}
    # full logits by a Ray Data pool of two actors (rows come back in id order whoever computed them); top-k and
    # the views by this process, as a local-mode run builds them (cache.build_cache(in_process=True))
    for k, actors, here in ((None, 2, False), (5, 1, True)):
        uri = str(root / f"k{k}")
        info = build_cache(uri, teacher_spec=SPEC, teacher_state=state, teacher_sha256="t" * 64, splits=splits,
                           data_fingerprint=data_fp, k=k, num_actors=actors, batch_size=32, in_process=here)
        caches[k] = (uri, info)
    aug = make_augment("crop_flip", 2, 3, 8)  # FKD: 3 augmented views per sample
    info = build_cache(str(root / "views"), teacher_spec=SPEC, teacher_state=state, teacher_sha256="t" * 64,
                       splits=splits, data_fingerprint=data_fp, views=3, augment="crop_flip", augment_pad=2, seed=3,
                       batch_size=32, in_process=True)
    caches["views"] = (str(root / "views"), info, aug)
    return {"teacher": teacher, "state": state, "splits": splits, "shard": shard, "x": x, "expected": expected,
            "caches": caches, "data_fp": data_fp}


def _batches(n):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    return [perm[i:i + 16] for i in range(0, n, 16)]


def test_inprocess_teacher_returns_teacher_logits(setup):
    t = InprocessTeacher(SPEC, setup["state"], torch.device("cpu"))
    for idx in _batches(len(setup["x"])):
        out = t.result(t.request(idx, setup["x"][idx], None))
        torch.testing.assert_close(out.logits, setup["expected"][idx])


def test_live_teacher_returns_teacher_logits(setup, ray_local):
    actor = start_teacher_server("teacher-modes-test", SPEC, setup["state"],
                                 ScaleConfig(teacher_cpus=0.25, teacher_batch_window_ms=1.0, teacher_max_batch=4096))
    t = LiveTeacher("teacher-modes-test", torch.device("cpu"), rank=1)
    batches = _batches(len(setup["x"]))
    pending = t.request(batches[0], setup["x"][batches[0]], None)
    for i, idx in enumerate(batches):  # the worker's pipelined pattern: ask for i+1 before using i
        out = t.result(pending)
        if i + 1 < len(batches):
            pending = t.request(batches[i + 1], setup["x"][batches[i + 1]], None)
        torch.testing.assert_close(out.logits, setup["expected"][idx], rtol=1e-5, atol=1e-5)
    ray_local.kill(actor)


def test_cached_teacher_full_logits_match_by_sample_id(setup):
    uri, info = setup["caches"][None]
    ids = setup["splits"].train.ids[setup["shard"]]
    t = CachedTeacher(uri, info.__dict__, ids, torch.device("cpu"))
    assert info.rows == len(setup["splits"].train) and info.teacher_forward_samples == info.rows
    for idx in _batches(len(ids)):
        out = t.result(t.request(torch.as_tensor(ids)[idx], setup["x"][idx], torch.zeros(len(idx), dtype=torch.long)))
        torch.testing.assert_close(out.logits, setup["expected"][idx], rtol=2e-3, atol=2e-3)  # fp16 storage


def test_cached_teacher_topk_matches_by_sample_id(setup):
    uri, info = setup["caches"][5]
    ids = setup["splits"].train.ids[setup["shard"]]
    t = CachedTeacher(uri, info.__dict__, ids, torch.device("cpu"))
    probs, classes = torch.softmax(setup["expected"], 1).topk(5, dim=1)
    for idx in _batches(len(ids)):
        # the cache hands out log p of the distribution rebuilt from the top-5: exact on the teacher's top-5
        # classes, the rest of the mass spread evenly over the other 5
        views = torch.zeros(len(idx), dtype=torch.long)
        p_all = t.result(t.request(torch.as_tensor(ids)[idx], setup["x"][idx], views)).logits.exp()  # (B, 10)
        c = classes[idx]
        torch.testing.assert_close(p_all.gather(1, c), probs[idx], rtol=2e-3, atol=2e-3)
        tail = p_all.scatter(1, c, 0.0).sum(1)  # mass off the top-5
        torch.testing.assert_close(tail, 1 - probs[idx].sum(1), rtol=0, atol=5e-3)
        rest = p_all.scatter(1, c, float("nan"))
        torch.testing.assert_close(rest.nanmean(1), tail / 5)


def test_cache_from_another_teacher_or_k_is_refused(setup):
    uri, _ = setup["caches"][None]
    fp = setup["data_fp"]
    with pytest.raises(CacheError, match="another teacher"):
        check_cache(uri, cache_fingerprint("u" * 64, fp, None), teacher_sha256="u" * 64, data_fingerprint=fp, k=None)
    with pytest.raises(CacheError, match="k=None"):
        check_cache(uri, cache_fingerprint("t" * 64, fp, 5), teacher_sha256="t" * 64, data_fingerprint=fp, k=5)
    with pytest.raises(CacheError, match="other data"):
        check_cache(uri, cache_fingerprint("t" * 64, "d", None), teacher_sha256="t" * 64, data_fingerprint="d", k=None)
    assert check_cache(uri, cache_fingerprint("t" * 64, fp, None), teacher_sha256="t" * 64,
                       data_fingerprint=fp, k=None).rows > 0


def test_cached_views_are_the_teachers_logits_on_exactly_those_views(setup):
    """A cache of 3 augmented views: the row (sample, view) holds the teacher's logits on that sample's
    view regenerated from (seed, id, view), i.e. on the very pixels the student trains on for that view."""
    uri, info, aug = setup["caches"]["views"]
    ids = setup["splits"].train.ids[setup["shard"]]
    assert info.views == 3 and info.rows == 3 * len(setup["splits"].train) == info.teacher_forward_samples
    assert info.transform == aug.transform
    t = CachedTeacher(uri, info.__dict__, ids, torch.device("cpu"))
    x, differ = setup["x"], 0
    for v in range(3):
        with torch.inference_mode():
            expected = setup["teacher"](aug(x, ids, v))  # (N, K): the teacher on view v of every sample
        differ += int((expected - setup["expected"]).abs().amax() > 1e-2)  # a view is not the plain image
        for idx in _batches(len(ids)):
            views = torch.full((len(idx),), v)
            out = t.result(t.request(torch.as_tensor(ids)[idx], aug(x[idx], ids[idx], v), views))
            torch.testing.assert_close(out.logits, expected[idx], rtol=2e-3, atol=2e-3)
    assert differ == 3
    # mixed views in one batch, as a training step asks for them: one gather, each sample its own view
    idx = torch.arange(len(ids))
    views = torch.arange(len(ids)) % 3
    with torch.inference_mode():
        expected = setup["teacher"](aug(x, ids, views))
    torch.testing.assert_close(t.request(torch.as_tensor(ids)[idx], None, views).logits, expected, rtol=2e-3, atol=2e-3)


def test_cache_of_other_views_or_transform_is_refused(setup):
    uri, info, aug = setup["caches"]["views"]
    fp = setup["data_fp"]
    common = dict(teacher_sha256="t" * 64, data_fingerprint=fp, k=None)
    assert check_cache(uri, cache_fingerprint("t" * 64, fp, None, 3, aug.transform), views=3,
                       transform=aug.transform, **common).views == 3
    with pytest.raises(CacheError, match=r"3 views \(this run wants 2\)"):
        check_cache(uri, cache_fingerprint("t" * 64, fp, None, 2, aug.transform), views=2, transform=aug.transform,
                    **common)
    other = make_augment("crop", 2, 3, 8).transform  # no flip: other views
    with pytest.raises(CacheError, match="another transform"):
        check_cache(uri, cache_fingerprint("t" * 64, fp, None, 3, other), views=3, transform=other, **common)
    reseeded = make_augment("crop_flip", 2, 4, 8).transform  # another seed: other views
    with pytest.raises(CacheError, match="another transform"):
        check_cache(uri, cache_fingerprint("t" * 64, fp, None, 3, reseeded), views=3, transform=reseeded, **common)
    plain, _ = setup["caches"][None]  # a one-view cache of plain images, asked for by an augmented run
    with pytest.raises(CacheError, match=r"another transform.*1 views \(this run wants 3\)"):
        check_cache(plain, cache_fingerprint("t" * 64, fp, None, 3, aug.transform), views=3, transform=aug.transform,
                    **common)


def test_corrupt_or_missing_shard_is_a_clear_error(setup, tmp_path):
    import shutil

    from raydistill.cache import load_for_ids, read_info

    src, _ = setup["caches"][None]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    shard = bad / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    with pytest.raises(CacheError, match="corrupt"):
        load_for_ids(str(bad), setup["splits"].train.ids[:3], read_info(str(bad)))
    shard.unlink()
    with pytest.raises(CacheError, match="missing"):
        load_for_ids(str(bad), setup["splits"].train.ids[:3], read_info(str(bad)))
    with pytest.raises(CacheError, match="cache.json missing"):
        read_info(str(tmp_path / "nowhere"))
