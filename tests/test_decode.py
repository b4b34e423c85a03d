"""The compiled decode step (kernels/decode.py) against the engine's KV-cache forward: logits to
float rounding, greedy tokens equal, on every SIMD level the CPU runs, for top-K, N:M blocks,
l2 rescale and SPEC 11 thresholds."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import float_arrays

from minisparse.calibrate import collect_inputs
from minisparse.generate import compiled_decoder, generate
from minisparse.kernels import pack_model, topk_indices, unpack_model
from minisparse.kernels.decode import Decoder, _claim_run, decoder_for
from minisparse.kernels.token import EXACT_KEPT, token_outputs
from minisparse.kernels.token import quantize as _quantize
from minisparse.kernels.token import top_codes as _top_codes
from minisparse.model import GPT, GPTConfig, KVCache
from minisparse.quant import absmax_quantize
from minisparse.sparsity import calibrate_threshold

THRESHOLD = dict(sparsify="threshold", sparsity=0.75)  # relu2: over half of ffn_down are 0
CONFIGS = [dict(sparsity=0.5, bits=1.58), dict(sparsity=0.5, ffn_act="silu"), dict(bits=1.58),
           dict(), dict(block=(2, 4), bits=1.58), dict(block=(3, 8)),
           dict(sparsity=0.6, rescale="l2", bits=1.58), dict(sparsity=0.6, rescale="l2"),
           dict(THRESHOLD, bits=1.58), THRESHOLD]


def _model(**extra):
    config = GPTConfig(**dict(dict(vocab_size=23, d_model=32, n_layers=2, n_heads=2,
                                   context=12, ffn_hidden=80), **extra))
    model = GPT(config, np.random.default_rng(3), backend="numba")
    if config.sparsify == "threshold":  # SPEC 11's taus for S on a few random tokens
        tokens = np.random.default_rng(4).integers(0, config.vocab_size, (2, config.context))
        params = dict(model.named_parameters())
        for i, sites in enumerate(collect_inputs(model, tokens)):
            for site, values in sites.items():
                tau = calibrate_threshold(values, config.sparsity)
                params[f"blocks.{i}.tau.{site}"].data[()] = tau
    pack_model(model)
    return model


@pytest.mark.parametrize("extra", CONFIGS)
def test_step_logits_equal_the_engine(level, extra):
    model = _model(**extra)
    decoder, cache = decoder_for(model), KVCache(model.config)
    for token in [3, 0, 22, 7, 7, 1, 5, 9, 2, 11, 4, 6]:
        want = model(np.array([[token]]), kv_cache=cache)[0].data[0, -1]
        got = decoder.step(token)
        # float rounding only: attention sums run in another order (an int8 boundary flip
        # would show as a visibly larger difference and fail here)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="context"):
        decoder.step(0)


@pytest.mark.parametrize("extra", [dict(sparsity=0.5, bits=1.58), dict(block=(2, 4), bits=1.58),
                                   dict(sparsity=0.6, rescale="l2", bits=1.58),
                                   dict(THRESHOLD, bits=1.58)])
def test_greedy_generation_equals_the_engine(level, extra):
    model = _model(**extra)
    fast = generate(model, [1, 2, 3], 30, temperature=0)  # 30 > context: window refills
    unpack_model(model)
    assert compiled_decoder(model) is None
    slow = generate(model, [1, 2, 3], 30, temperature=0)
    assert fast == slow


@pytest.mark.parametrize("extra", CONFIGS)
def test_two_workers_equal_one_bit_for_bit(level, extra):
    # the shared tiles are computed by the same code whichever worker claims them, and every
    # worker computes the rest itself: the logits may not differ in a single bit
    model = _model(**extra)
    one, two = Decoder(model, workers=1), Decoder(model, workers=2)
    tokens = np.random.default_rng(6).integers(0, model.config.vocab_size, 12)
    np.testing.assert_array_equal(two.prefill(tokens[:5]), one.prefill(tokens[:5]))
    for t in tokens[5:]:
        np.testing.assert_array_equal(two.step(t), one.step(t))
    np.testing.assert_array_equal(two.k_cache[0], one.k_cache[0])
    np.testing.assert_array_equal(two.k_cache[1], one.k_cache[0])


@pytest.mark.parametrize("extra", [dict(sparsity=0.5, bits=1.58), dict(bits=1.58)])
def test_column_parts_give_the_same_logits(level, extra):
    # ffn_hidden 256: up and gate are 128 code columns side by side, which two workers keep
    # as two parts of 64 (whole tiles on every level); q k v (3 x 8 columns) stay whole
    model = _model(ffn_hidden=256, **extra)
    one, two = Decoder(model, workers=1), Decoder(model, workers=2)
    assert one.codes[2].shape[1] == 1 and two.codes[0].shape[1] == 1
    assert two.codes[2].shape[1] == (1 if level == "portable" else 2)
    cache = KVCache(model.config)
    for t in [3, 0, 22, 7, 7, 1, 5, 9]:
        want = model(np.array([[t]]), kv_cache=cache)[0].data[0, -1]
        got = two.step(t)
        np.testing.assert_array_equal(got, one.step(t))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_the_test_models_thresholds_are_positive():
    # the threshold configs above exercise a mask, not "keep everything" or "keep nothing"
    model = _model(**THRESHOLD)
    taus = [p.data for name, p in model.named_parameters() if ".tau." in name]
    assert len(taus) == 8 and all(t > 0 for t in taus)


def test_uncovered_configs_keep_the_engine_path():
    assert decoder_for(_model(sparsity=0.5, ffn="moe", n_experts=2, top_experts=1)) is None
    model = _model(sparsity=0.5)
    unpack_model(model)
    assert compiled_decoder(model) is None


@pytest.mark.parametrize("extra", CONFIGS)
@pytest.mark.parametrize("cached", [0, 5])
def test_prefill_equals_single_steps_and_the_full_forward(extra, cached):
    model = _model(**extra)
    tokens = np.random.default_rng(cached).integers(0, model.config.vocab_size, 12)
    stepped, filled = decoder_for(model), decoder_for(model)
    steps = np.stack([stepped.step(t) for t in tokens])
    if cached:
        filled.prefill(tokens[:cached])
    got = filled.prefill(tokens[cached:])
    assert got.shape == (12 - cached, model.config.vocab_size) and filled.length == 12
    # the same operations per position, only in another order (block by block): bit-equal
    np.testing.assert_array_equal(got, steps[cached:])
    want = model(tokens[None])[0].data[0]  # the engine's forward over the whole window
    np.testing.assert_allclose(got, want[cached:], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="context"):
        filled.prefill(tokens[:1])


@settings(max_examples=60, deadline=None)
@given(float_arrays(st.integers(1, 70), bound=4.0, dtype=np.float32), st.booleans())
def test_quantize_equals_spec3(x, halves):
    if halves:  # max|x| = 127 makes s = 1: every x = k + 1/2 is a rounding tie (to even)
        x = np.append(np.floor(x * 30) + np.float32(0.5), np.float32(127)).astype(np.float32)
    q = np.empty(x.shape, np.int8)
    s = _quantize(x, q)
    want_q, want_s = absmax_quantize(x)
    assert s == want_s[0]
    np.testing.assert_array_equal(q, want_q)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(-2**31, 2**31 - 1), min_size=1, max_size=40), st.booleans(),
       st.booleans(), st.floats(1.0, 1.3e7, width=32), st.floats(0.5, 1e5, width=32),
       st.floats(0.5, 4.0, width=32))
def test_token_outputs_divide_as_numpy_does(sums, small, checked, s, scale, r):
    """float32(acc / float32(s_x s_w)) * r bit for bit: the float32 division taken when every
    |acc| <= 2^24 (small), with no look at the sums when at most EXACT_KEPT inputs were
    summed (128 K <= 2^24 bounds them), after one when more were; the float64 one otherwise."""
    acc = np.array(sums, np.int64)
    acc = (acc % (2**25 + 1) - 2**24 if small else acc).astype(np.int32)
    kept = 2 * EXACT_KEPT if checked or not small else EXACT_KEPT
    s, scale, r = np.float32(s), np.float32(scale), np.float32(r)
    want = (acc / (s * scale)).astype(np.float32) * r
    got = token_outputs(acc, s, scale, r, kept)
    assert np.array_equal(got.view(np.int32), want.view(np.int32))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-128, 127), min_size=1, max_size=300), st.data())
def test_top_codes_equal_topk_indices(codes, data):
    q = np.array(codes, np.int8)  # few distinct values: many ties at the k-th magnitude
    k = data.draw(st.integers(1, q.shape[0]))
    idx = np.full(q.shape[0], -1, np.int64)
    assert _top_codes(q, k, idx) == k
    np.testing.assert_array_equal(idx[:k], topk_indices(q.astype(np.float32), k))


@pytest.mark.parametrize("k", [1, 35_000, 69_999])
def test_top_codes_count_past_the_uint16_blocks(k):
    # counts are summed in uint16 blocks of 65,535 entries: a longer row spans two
    q = np.random.default_rng(k).integers(-128, 128, 70_000).astype(np.int8)
    idx = np.full(q.shape[0], -1, np.int64)
    assert _top_codes(q, k, idx) == k
    np.testing.assert_array_equal(idx[:k], topk_indices(q.astype(np.float32), k))


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.lists(st.booleans(), max_size=12))
def test_claimed_runs_take_every_tile_exactly_once(n_tiles, size, turns):
    """Two workers ask for runs of ``size`` tiles in any interleaving (the drawn turns, then
    in turn), each until it gets an empty run, as _simd_tiles does: the front's runs go up
    from 0, the back's down from n_tiles, and together they cover every tile once."""
    counters = np.zeros(2, np.int64)
    runs = {0: [], 1: []}
    asking = {0, 1}
    turns = [int(t) for t in turns] + [0, 1] * (n_tiles + 1)
    for worker in turns:
        if worker not in asking:
            continue
        sync = (counters, 0, 0, 0, (np.int64(worker), np.int64(2)))
        lo, hi = _claim_run(sync, 0, n_tiles, size)
        if lo == hi:
            asking.discard(worker)
        else:
            assert 0 <= lo < hi <= n_tiles and hi - lo <= size
            runs[worker].append((lo, hi))
    assert not asking
    front = [t for lo, hi in runs[0] for t in range(lo, hi)]
    back = [t for lo, hi in runs[1] for t in range(lo, hi)]
    assert front == list(range(len(front)))  # contiguous from the front
    assert sorted(back) == list(range(n_tiles - len(back), n_tiles))  # and from the back
    assert sorted(front + back) == list(range(n_tiles))


@pytest.mark.parametrize("cached", [1, 4])
def test_torch_kv_cache_equals_its_full_forward(cached):
    # the bench's PyTorch eager decode row runs minisparse.torch's GPT with this cache
    torch = pytest.importorskip("torch", reason="torch not installed")
    from minisparse.torch.model import GPT as TorchGPT
    from minisparse.torch.model import KVCache as TorchKVCache

    config = dict(vocab_size=23, d_model=32, n_layers=2, n_heads=2, context=12, ffn_hidden=80,
                  sparsity=0.5, bits=1.58)
    model = TorchGPT(config, np.random.default_rng(3))
    idx = torch.from_numpy(np.random.default_rng(5).integers(0, 23, (1, 9)))
    cache = TorchKVCache()
    with torch.no_grad():
        want = model(idx)[0]
        parts = [model(idx[:, :cached], kv_cache=cache)[0]]
        parts += [model(idx[:, t:t + 2], kv_cache=cache)[0] for t in range(cached, 9, 2)]
        with pytest.raises(ValueError, match="context"):
            model(idx[:, :4], kv_cache=cache)
    assert cache.length == 9
    torch.testing.assert_close(torch.cat(parts, dim=1), want, rtol=1e-4, atol=1e-5)
