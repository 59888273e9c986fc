"""CLAP towers, loss and shared layers: shapes, padding independence, global-batch loss."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ldm_jax import parallel
from ldm_jax.clap import model as clap_model
from ldm_jax.clap.text import EOS_ID, Tokenizer, pool_tokens
from ldm_jax.nn.attention import MultiHeadAttention, TransformerBlock
from ldm_jax.nn.embeddings import sinusoidal_embedding

WIDTH, EMBED, VOCAB, MAX_LEN = 32, 16, 64, 12
RATE, HOP, N_FFT = 8000, 128, 256


def make_test_config(**overrides) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict(dict(
        embed_dim=EMBED, dtype="float32", remat=False, logit_scale_init=math.log(1 / 0.07),
        logit_scale_max=math.log(100.0),
        text=dict(vocab_size=VOCAB, max_length=MAX_LEN, width=WIDTH, num_layers=1, num_heads=2,
                  mlp_ratio=2.0, pooling="eos", dropout_rate=0.0),
        audio=dict(sample_rate=RATE, max_seconds=1.0, n_fft=N_FFT, hop_length=HOP, n_mels=16,
                   fmin=0.0, fmax=None, mel_offset=-3.0, mel_scale=2.0, stem_strides=(2, 2),
                   width=WIDTH, num_layers=1, num_heads=2, mlp_ratio=2.0, dropout_rate=0.0)))
    m.update(overrides)
    return m


def transformer_params(width: int, layers: int, mlp_ratio: float) -> int:
    hidden = int(width * mlp_ratio)
    block = 4 * (width * width + width) + 2 * 2 * width + width * hidden + hidden \
        + hidden * width + width
    return layers * block + 2 * width


@pytest.fixture(scope="module")
def cfg():
    return make_test_config()


@pytest.fixture(scope="module")
def params(cfg):
    return jax.jit(lambda r: clap_model.init_params(cfg, r))(jax.random.key(0))


@pytest.fixture(scope="module")
def embed_fns(cfg):
    audio = jax.jit(lambda p, w, m: clap_model.make_model(cfg).apply(
        {"params": p}, w, m, method=clap_model.Clap.encode_audio))
    text = jax.jit(lambda p, t, m: clap_model.make_model(cfg).apply(
        {"params": p}, t, m, method=clap_model.Clap.encode_text))
    return text, audio


@pytest.fixture(scope="module")
def tokenizer():
    words = ["slow", "fast", "organ", "bell", "melody", "chords", "in", "C", "major", "minor",
             "played", "softly", "loudly", "at", "BPM", "a", "piece"]
    rng = np.random.default_rng(0)
    captions = [" ".join(rng.choice(words, size=rng.integers(3, 9))) for _ in range(200)]
    return Tokenizer.train(captions, vocab_size=48, model_type="unigram")


def test_parameter_count_and_shapes(cfg, params, embed_fns):
    count = sum(x.size for x in jax.tree_util.tree_leaves(params))
    positions = MAX_LEN * WIDTH + 16 * WIDTH  # audio: ceil(ceil((1 + 8000 // 128) / 2) / 2)
    text = VOCAB * WIDTH + transformer_params(WIDTH, 1, 2.0) + WIDTH * EMBED
    audio = (3 * 16 * WIDTH + WIDTH) + (3 * WIDTH * WIDTH + WIDTH) \
        + transformer_params(WIDTH, 1, 2.0) + WIDTH * EMBED
    assert count == positions + text + audio + 1
    text_fn, audio_fn = embed_fns
    states, aux = text_fn(params, jnp.ones((3, 7), jnp.int32), jnp.ones((3, 7), bool))
    assert states.shape == (3, 7, WIDTH) and aux["embedding"].shape == (3, EMBED)
    wave = jnp.zeros((2, 4000))
    states, aux = audio_fn(params, wave, jnp.ones((2, 4000), bool))
    assert states.shape == (2, 8, WIDTH) and aux["mask"].shape == (2, 8)
    np.testing.assert_allclose(np.linalg.norm(aux["embedding"], axis=-1), 1.0, rtol=1e-5)
    assert float(params["logit_scale"]) == pytest.approx(math.log(1 / 0.07))


def test_audio_embedding_does_not_depend_on_padding(params, embed_fns):
    _, audio_fn = embed_fns
    rng = np.random.default_rng(1)
    lengths = [5000, 3100]
    clips = [0.3 * rng.standard_normal(n).astype(np.float32) for n in lengths]

    def padded(total, fill):
        wave = np.full((2, total), fill, np.float32)
        mask = np.zeros((2, total), bool)
        for i, c in enumerate(clips):
            wave[i, :len(c)], mask[i, :len(c)] = c, True
        return wave, mask

    s1, a1 = audio_fn(params, *padded(5200, 0.0))
    s2, a2 = audio_fn(params, *padded(8000, 0.7))  # garbage beyond the mask is ignored too
    np.testing.assert_allclose(a1["embedding"], a2["embedding"], atol=1e-5)
    n = int(a1["mask"][1].sum())
    assert n < a1["mask"].shape[1] and np.array_equal(a1["mask"][:, :n], a2["mask"][:, :n])
    np.testing.assert_allclose(s1[1, :n], s2[1, :n], atol=1e-4)
    other = np.roll(padded(5200, 0.0)[0], 1, axis=0)
    _, a3 = audio_fn(params, other, padded(5200, 0.0)[1])
    assert np.abs(np.asarray(a3["embedding"]) - np.asarray(a1["embedding"])).max() > 1e-3
    with pytest.raises(clap_model.ClapError, match="longer than model.audio.max_seconds=1.0"):
        audio_fn(params, np.zeros((1, 9000), np.float32), np.ones((1, 9000), bool))


def test_text_embedding_does_not_depend_on_padding(params, tokenizer, embed_fns):
    text_fn, _ = embed_fns
    captions = ["slow organ melody in C major", "a bell"]
    t1, m1 = tokenizer.encode(captions, 8)
    t2, m2 = tokenizer.encode(captions, MAX_LEN)
    s1, a1 = text_fn(params, t1, m1)
    s2, a2 = text_fn(params, t2, m2)
    np.testing.assert_allclose(a1["embedding"], a2["embedding"], atol=1e-6)
    np.testing.assert_allclose(s1, s2[:, :8], atol=1e-5)
    assert np.all(np.asarray(s2)[~m2] == 0)
    # Mean pooling of the same states gives another embedding from the same parameters.
    mean = pool_tokens(s2, m2, "mean")
    np.testing.assert_allclose(mean[1], np.asarray(s2)[1, :m2[1].sum()].mean(0), atol=1e-6)


def test_text_layers_are_the_embeddings_blocks_and_final_states(params, tokenizer, embed_fns):
    cfg = make_test_config(text={**make_test_config().text, "num_layers": 2})
    two = jax.jit(lambda r: clap_model.init_params(cfg, r))(jax.random.key(3))
    tokens, mask = tokenizer.encode(["slow organ melody in C major", "a bell"], MAX_LEN)
    final, emb = clap_model.make_embedders(cfg)[0](two, tokens, mask)
    standardise = lambda h: np.where(mask[..., None], (h - h.mean(-1, keepdims=True)) / np.sqrt(
        h.var(-1, keepdims=True) + 1e-5), 0.0)
    text = two["text"]
    by_hand = standardise(np.asarray(text["token_embedding"]["embedding"])[tokens]
                          + np.asarray(text["positions"]["position_embedding"])[:MAX_LEN])
    for layer in (0, -3):
        states, emb0 = clap_model.make_text_embedder(cfg, layer)(two, tokens, mask)
        np.testing.assert_allclose(states, by_hand, atol=1e-4)
        np.testing.assert_array_equal(emb0, emb)  # the pooled embedding is always the final one
    for layer in (2, -1):
        np.testing.assert_array_equal(clap_model.make_text_embedder(cfg, layer)(
            two, tokens, mask)[0], final)
    block = np.asarray(clap_model.make_text_embedder(cfg, -2)(two, tokens, mask)[0])
    assert np.abs(block - by_hand).max() > 0.1 and np.abs(block - np.asarray(final)).max() > 0.1
    np.testing.assert_allclose(block[mask].std(-1), 1.0, rtol=1e-3)
    for layer in (3, -4):
        with pytest.raises(clap_model.ClapError, match=f"text layer {layer} is outside"):
            clap_model.make_text_embedder(cfg, layer)


def test_long_text_is_truncated_and_empty_caption_is_handled(cfg, params, tokenizer):
    long = " ".join(["slow organ melody played softly"] * 10)
    tokens, mask = tokenizer.encode([long, ""], MAX_LEN)
    assert mask[0].all() and tokens[0, -1] == EOS_ID and mask[1].sum() == 2
    emb = np.asarray(jax.jit(lambda p, t, m: clap_model.embed_text(p, t, m, cfg))(
        params, tokens, mask))
    assert np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
    too_long, too_long_mask = tokenizer.encode([long], MAX_LEN + 4)
    with pytest.raises(clap_model.ClapError, match="encode them with max_length=12"):
        clap_model.embed_text(params, too_long, too_long_mask, cfg)


def test_contrastive_loss_matches_hand_computation():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 3))
    t = rng.standard_normal((4, 3))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    scale = math.log(10.0)
    logits = 10.0 * a @ t.T
    a2t = np.mean([np.log(np.exp(logits[i]).sum()) - logits[i, i] for i in range(4)])
    t2a = np.mean([np.log(np.exp(logits[:, i]).sum()) - logits[i, i] for i in range(4)])
    got = clap_model.similarity_logits(jnp.asarray(a, jnp.float32), jnp.asarray(t, jnp.float32),
                                       jnp.float32(scale))
    loss, metrics = clap_model.contrastive_loss(got)
    np.testing.assert_allclose(float(loss), (a2t + t2a) / 2, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss/audio_to_text"]), a2t, rtol=1e-5)
    assert float(metrics["accuracy/text_to_audio"]) == np.mean(logits.argmax(0) == np.arange(4))
    perfect = clap_model.contrastive_loss(100.0 * jnp.eye(4))[0]
    assert float(perfect) < 1e-3


def test_temperature_is_clamped(cfg, params):
    big = {**params, "logit_scale": jnp.float32(9.0)}
    tokens = jnp.ones((2, 4), jnp.int32)
    logits, aux = jax.jit(clap_model.make_model(cfg).apply)(
        {"params": big}, tokens, tokens > 0, jnp.zeros((2, 1000)), None)
    assert float(aux["logit_scale"]) == pytest.approx(math.log(100.0))
    assert logits.shape == (2, 2) and float(jnp.abs(logits).max()) <= 100.0 + 1e-3


@pytest.mark.parametrize("shape", [{"data": 8}, {"data": 2, "fsdp": 4}])
def test_global_batch_loss_is_the_same_on_sharded_devices(shape):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((16, EMBED)).astype(np.float32)
    t = rng.standard_normal((16, EMBED)).astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True)

    def loss(a, t, s):
        return clap_model.contrastive_loss(clap_model.similarity_logits(a, t, s))[0]

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
    one = jax.jit(grad)(a, t, jnp.float32(2.5))
    mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, **shape})
    sharded = parallel.batch_sharding(mesh, 2)
    a_s, t_s = jax.device_put(a, sharded), jax.device_put(t, sharded)
    assert len(a_s.sharding.device_set) == 8
    many = jax.jit(grad, in_shardings=(sharded, sharded, parallel.replicated(mesh)))(
        a_s, t_s, jnp.float32(2.5))
    np.testing.assert_allclose(many[0], one[0], rtol=1e-5)
    for g_many, g_one in zip(many[1], one[1]):
        np.testing.assert_allclose(g_many, g_one, rtol=1e-5, atol=1e-7)


def test_partition_rules_match_tower_parameters():
    # Width 128: the test model's kernels are below FSDP_MIN_SIZE.
    cfg = make_test_config(text={**make_test_config().text, "width": 128},
                           audio={**make_test_config().audio, "width": 128})
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    boxed = jax.eval_shape(lambda r: clap_model.init_params(cfg, r, boxed=True),
                           jax.random.key(0))
    shardings = parallel.tree_shardings(boxed, mesh)
    block = shardings["text"]["transformer"]["block_0"]
    assert block["attn"]["query"]["kernel"].spec == P("fsdp", "tensor")
    assert block["attn"]["out"]["kernel"].spec == P("tensor", "fsdp")
    assert block["mlp"]["fc1"]["kernel"].spec == P("fsdp", "tensor")
    assert block["mlp"]["fc2"]["kernel"].spec == P("tensor", "fsdp")
    # The vocabulary over fsdp; its width whole (split, GSPMD would run the tower
    # feature-sharded).
    assert shardings["text"]["token_embedding"]["embedding"].spec == P("fsdp", None)
    assert shardings["audio"]["stem_1"]["kernel"].spec == P(None, "fsdp", None)
    assert isinstance(shardings["logit_scale"], NamedSharding)
    assert shardings["logit_scale"].spec == P()


def test_cross_attention_ignores_padded_context():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
    ctx = rng.standard_normal((2, 6, 12)).astype(np.float32)
    ctx_mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], bool)
    block = TransformerBlock(num_heads=2, cross_attention=True)
    variables = jax.jit(block.init)(jax.random.key(0), x, None, ctx, ctx_mask)
    apply = jax.jit(block.apply)
    out = apply(variables, x, None, ctx, ctx_mask)
    noisy = np.where(ctx_mask[..., None], ctx, 100.0)
    np.testing.assert_allclose(apply(variables, x, None, noisy, ctx_mask), out, atol=1e-5)
    assert "cross_attn" in variables["params"] and "ln_cross" in variables["params"]
    attn = MultiHeadAttention(num_heads=2, dtype=jnp.bfloat16)
    v = nn.meta.unbox(jax.jit(lambda r, x: attn.init(r, x, causal=True))(jax.random.key(1), x))
    apply = jax.jit(lambda v, x: attn.apply(v, x, causal=True))
    y = apply(v, x)
    assert y.dtype == jnp.bfloat16 and v["params"]["query"]["kernel"].dtype == jnp.float32
    # Causal: the first position only sees itself, so later inputs do not change it.
    y2 = apply(v, x.at[:, 1:].set(5.0))
    np.testing.assert_allclose(np.asarray(y[:, 0], np.float32), np.asarray(y2[:, 0], np.float32),
                               atol=1e-2)


def test_attention_implementation_switch():
    from ldm_jax.config import ConfigError
    from ldm_jax.diffusion import unet as unet_lib
    from ldm_jax.diffusion.schedules import DiffusionError
    from ldm_jax.nn.attention import check_attention_impl

    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
    attn = MultiHeadAttention(num_heads=2, implementation="xla")
    v = nn.meta.unbox(jax.jit(attn.init)(jax.random.key(2), x))
    y = np.asarray(jax.jit(attn.apply)(v, x))
    # The XLA path is the textbook formula.
    p = v["params"]
    heads = lambda name: (np.asarray(x) @ np.asarray(p[name]["kernel"])
                          + np.asarray(p[name]["bias"])).reshape(2, 5, 2, 4)
    q, k, val = heads("query"), heads("key"), heads("value")
    logits = np.einsum("bthd,bshd->bhts", q, k) / 2.0
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    mixed = np.einsum("bhts,bshd->bthd", weights, val).reshape(2, 5, 8)
    want = mixed @ np.asarray(p["out"]["kernel"]) + np.asarray(p["out"]["bias"])
    np.testing.assert_allclose(y, want, atol=1e-5)
    # cuDNN's fused kernel is refused in one line where it cannot run.
    check_attention_impl("xla", jnp.float32)
    check_attention_impl("cudnn", jnp.bfloat16, platform="gpu")
    with pytest.raises(ConfigError, match="needs an NVIDIA GPU; this JAX runs on cpu"):
        check_attention_impl("cudnn", jnp.bfloat16, platform="cpu")
    with pytest.raises(ConfigError, match="bfloat16 or float16, not float32"):
        check_attention_impl("cudnn", jnp.float32, platform="gpu")
    with pytest.raises(ConfigError, match="unknown"):
        check_attention_impl("flash", jnp.float32)
    if jax.default_backend() != "gpu":
        with pytest.raises(ConfigError, match="needs an NVIDIA GPU"):
            unet_lib.make_unet({"attention_impl": "cudnn", "dtype": "bfloat16"})
        with pytest.raises(ConfigError, match="needs an NVIDIA GPU"):
            clap_model.make_model({"attention_impl": "cudnn", "dtype": "bfloat16"})
    with pytest.raises(DiffusionError, match="attention_impl"):
        unet_lib.UNetConfig(attention_impl="flash")
    with pytest.raises(clap_model.ClapError, match="attention_impl"):
        clap_model.ClapConfig(attention_impl="flash")


def test_sinusoidal_embedding():
    emb = np.asarray(sinusoidal_embedding(jnp.array([0.0, 3.0]), 6, max_period=100.0))
    freqs = 100.0 ** (-np.arange(3) / 3)
    expected = np.concatenate([np.cos(3.0 * freqs), np.sin(3.0 * freqs)])
    np.testing.assert_allclose(emb[0], [1, 1, 1, 0, 0, 0], atol=1e-7)
    np.testing.assert_allclose(emb[1], expected, rtol=1e-5, atol=1e-6)
    assert sinusoidal_embedding(jnp.zeros((2, 3)), 7).shape == (2, 3, 7)
