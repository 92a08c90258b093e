"""The policy: loading, sampling, streaming, the default model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bot.config import Config
from bot.errors import RapportError
from bot.policy import (
    DEFAULT_MODEL_NAME,
    SKINNY_ROWS,
    Int8WeightLinear,
    Policy,
    Settings,
    TransposedProductLinear,
    clean_reply,
    default_model_dir,
    fp32_layout,
    input_major,
    load_model,
    prepare_for_serving,
    sample_next,
    sample_rows,
)
from bot.prompt import Turn


def tiny_policy(folder, seed=0, **generation) -> Policy:
    config = Config()
    config.model.path = str(folder)
    for key, value in generation.items():
        setattr(config.generation, key, value)
    return Policy.load(config.model, config.generation, seed=seed)


def naive_sample_distribution(logits, seen, s: Settings):
    """Reference: HF-style penalty, temperature, then top-p by a full sort, as a loop."""
    logits = logits.clone()
    for t in set(seen.tolist()):
        logits[t] = (
            logits[t] / s.repetition_penalty
            if logits[t] > 0
            else (logits[t] * s.repetition_penalty)
        )
    probs = torch.softmax(logits / s.temperature, -1)
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep, mass = [], 0.0
    for i in order:
        if mass >= s.top_p:
            break
        keep.append(i)
        mass += float(probs[i])
    out = torch.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()


def test_sampling_matches_a_naive_loop():
    torch.manual_seed(0)
    logits = torch.randn(50) * 2
    seen = torch.tensor([3, 3, 7, 11])
    s = Settings(temperature=0.8, top_p=0.7, max_new_tokens=1, repetition_penalty=1.3)
    expected = naive_sample_distribution(logits, seen, s)
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(50)
    for _ in range(4000):
        counts[sample_next(logits, seen, s, g)] += 1
    assert set(torch.nonzero(counts).flatten().tolist()) <= set(
        torch.nonzero(expected).flatten().tolist()
    )
    assert torch.allclose(counts / counts.sum(), expected, atol=0.03)


def test_batched_sampling_draws_each_rows_nucleus_as_the_chat_does():
    """sample_rows (self-play, eval) samples every row from the distribution the chat's
    sample_next samples from, including a row whose nucleus lies beyond the top
    NUCLEUS_SEARCH tokens (full sort) beside rows whose nucleus is found in the top-k;
    one row draws the very token sample_next draws from the same generator state."""
    from bot.policy import NUCLEUS_SEARCH

    torch.manual_seed(0)
    s = Settings(temperature=0.8, top_p=0.7, max_new_tokens=1, repetition_penalty=1.0)
    none = torch.tensor([], dtype=torch.long)
    vocab = NUCLEUS_SEARCH * 2
    peaked = torch.full((vocab,), -10.0)
    peaked[:6] = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.5, 0.0])
    flat = torch.randn(vocab) * 0.01  # its nucleus: ~70% of 512 tokens, past the top 256
    rows = torch.stack([peaked, flat, peaked.flip(0)])
    g = torch.Generator().manual_seed(2)
    drawn = torch.stack([sample_rows(rows, s, g) for _ in range(4000)])  # (4000, 3)
    for r in (0, 2):
        expected = naive_sample_distribution(rows[r], none, s)
        counts = torch.bincount(drawn[:, r], minlength=vocab).float()
        assert set(torch.nonzero(counts).flatten().tolist()) <= set(
            torch.nonzero(expected).flatten().tolist()
        )
        assert torch.allclose(counts / counts.sum(), expected, atol=0.03)
    nucleus = set(torch.nonzero(naive_sample_distribution(flat, none, s)).flatten().tolist())
    assert len(nucleus) > NUCLEUS_SEARCH and set(drawn[:, 1].tolist()) <= nucleus
    assert len(set(drawn[:, 1].tolist())) > NUCLEUS_SEARCH  # reached past the top-k
    for seed in range(20):
        logits = torch.randn(1000) * 3
        a = sample_next(logits, none, s, torch.Generator().manual_seed(seed))
        b = sample_rows(logits[None], s, torch.Generator().manual_seed(seed))
        assert a == int(b[0])
    greedy = Settings(temperature=0, top_p=1.0, max_new_tokens=1, repetition_penalty=1.0)
    assert sample_rows(rows, greedy).tolist() == [0, int(flat.argmax()), vocab - 1]


def test_paired_sampling_draws_each_nucleus_and_shares_the_draws_of_agreeing_models():
    """Keyed (paired) sampling, what `rapport eval` plays: each row still samples its
    nucleus distribution (also past the top-k, and without top-p); two models whose
    distributions nearly agree draw the same token for the same key far more often than
    independent draws would (at least (1 - TV)/(1 + TV), TV their total-variation
    distance); and a row's draw is a function of its key and step alone, not of the
    other rows beside it."""
    from bot.policy import NUCLEUS_SEARCH, row_key

    none = torch.tensor([], dtype=torch.long)
    s = Settings(temperature=0.8, top_p=0.7, max_new_tokens=1, repetition_penalty=1.0)
    vocab = NUCLEUS_SEARCH * 2
    peaked = torch.full((vocab,), -10.0)
    peaked[:6] = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.5, 0.0])
    flat = torch.randn(vocab, generator=torch.Generator().manual_seed(1)) * 0.01
    n = 4000
    keys = torch.tensor([row_key(7, i) for i in range(n)])
    for row, settings in ((peaked, s), (flat, s), (peaked, replace(s, top_p=1.0))):
        drawn = sample_rows(row.expand(n, vocab), settings, keys=keys, step=3)
        expected = naive_sample_distribution(row, none, settings)
        counts = torch.bincount(drawn, minlength=vocab).float()
        assert set(drawn.tolist()) <= set(torch.nonzero(expected).flatten().tolist())
        assert torch.allclose(counts / n, expected, atol=0.03)
    past = sample_rows(flat.expand(n, vocab), s, keys=keys, step=3)
    assert len(set(past.tolist())) > NUCLEUS_SEARCH  # the full sort, keyed too

    # a second model a little off the first: most keys draw the same token from both
    close = peaked + torch.randn(vocab, generator=torch.Generator().manual_seed(2)) * 0.3
    p = naive_sample_distribution(peaked, none, s)
    q = naive_sample_distribution(close, none, s)
    tv = float((p - q).abs().sum() / 2)
    a = sample_rows(peaked.expand(n, vocab), s, keys=keys, step=0)
    b = sample_rows(close.expand(n, vocab), s, keys=keys, step=0)
    same = float((a == b).float().mean())
    independent = float((p * q).sum())  # P(same) of unpaired draws
    assert 0.05 < tv < 0.3
    assert same >= (1 - tv) / (1 + tv) - 0.02 and same > independent + 0.3
    # another step or key: fresh draws, as unpaired ones would be
    again = sample_rows(peaked.expand(n, vocab), s, keys=keys, step=1)
    assert abs(float((a == again).float().mean()) - float((p * p).sum())) < 0.03

    # the other rows do not matter: a row drawn alone = the same row in a mixed batch
    batch = torch.stack([peaked, flat, close, peaked.flip(0)])
    rows = torch.tensor([row_key(9, i) for i in range(4)])
    for step in range(20):
        together = sample_rows(batch, s, keys=rows, step=step)
        for i in range(4):
            alone = sample_rows(batch[i : i + 1], s, keys=rows[i : i + 1], step=step)
            assert int(alone[0]) == int(together[i])


def test_batched_decoding_gives_each_row_its_own_reply_and_drops_ended_rows(tiny_model_dir):
    """What batched self-play and `rapport eval` decode with: each row of a left-padded
    batch (prompts of different lengths, copies side by side) is exactly the reply that
    row decodes alone (keyed draws; greedy: the chat's own reply, repetition penalty
    and all); a row ends at a stop token, or is cut at the limit and says so; and an
    ended row leaves the batch, so the last steps run on the live rows only."""
    from bot.policy import decode_rows, row_key

    model, tokenizer = load_model(tiny_model_dir)
    prompts = [tokenizer(t)["input_ids"] for t in ("hi", "tell me a story about cats", "ok then")]
    stops = set(range(0, len(tokenizer), 50))  # one token in 50 ends a row
    sampled = Settings(temperature=1.0, top_p=1.0, max_new_tokens=12, repetition_penalty=1.2)
    keys = [row_key(5, r) for r in range(len(prompts) * 2)]
    sizes = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: sizes.append(len(kwargs["input_ids"])), with_kwargs=True
    )
    tokens, cut = decode_rows(model, prompts, sampled, stops, copies=2, keys=keys)
    hook.remove()
    for row, key in enumerate(keys):
        alone, alone_cut = decode_rows(model, [prompts[row // 2]], sampled, stops, keys=[key])
        assert tokens[row] == alone[0] and cut[row] == alone_cut[0]
        assert not stops & set(tokens[row])
        assert cut[row] == (len(tokens[row]) == 12)
    assert any(cut) and not all(cut)  # some rows ended, some ran to the limit
    assert sizes[0] == 3 and sizes[1] == 6 and sizes[-1] < 6  # ended rows left the batch
    assert tokens[0] != tokens[1]  # two copies of a prompt: two draws

    greedy = replace(sampled, temperature=0.0)
    stop_ids = set(tokenizer.all_special_ids)
    tokens, cut = decode_rows(model, prompts, greedy, stop_ids)
    chat = Policy(model, tokenizer, version="t", model_config=Config().model, settings=greedy)
    for row, prompt in enumerate(prompts):
        finish = {}
        assert tokens[row] == list(chat.stream_tokens(prompt, finish))
        assert cut[row] == finish["cut"]


def test_greedy_and_penalty():
    logits = torch.tensor([1.0, 3.0, 2.9])
    greedy = Settings(temperature=0, top_p=1.0, max_new_tokens=1, repetition_penalty=1.0)
    assert sample_next(logits, torch.tensor([], dtype=torch.long), greedy) == 1
    penalised = Settings(temperature=0, top_p=1.0, max_new_tokens=1, repetition_penalty=1.5)
    assert sample_next(logits, torch.tensor([1]), penalised) == 2


def test_stream_yields_pieces_of_the_reply_and_respects_the_length(tiny_model_dir):
    policy = tiny_policy(tiny_model_dir, max_new_tokens=12)
    turns = [Turn("user", "hello there")]
    tokens = list(policy.stream_tokens(policy.prompt_ids(turns)))
    assert 1 <= len(tokens) <= 12
    assert not set(tokens) & policy.stop_ids
    again = tiny_policy(tiny_model_dir, max_new_tokens=12)
    pieces = list(again.stream(turns))
    assert "".join(pieces) == policy.tokenizer.decode(tokens, skip_special_tokens=True).lstrip()


def test_same_seed_same_reply(tiny_model_dir):
    turns = [Turn("user", "hi")]
    a = tiny_policy(tiny_model_dir, seed=3).reply(turns)
    b = tiny_policy(tiny_model_dir, seed=3).reply(turns)
    assert a == b


@pytest.mark.parametrize("stop", ["<|im_end|>", "<|im_start|>", "<|endoftext|>"])
def test_generation_stops_at_any_template_control_token(tiny_model_dir, stop):
    model, tokenizer = load_model(tiny_model_dir)
    stop_id = tokenizer.convert_tokens_to_ids(stop)
    with torch.no_grad():  # make the stop token the certain next token
        model.lm_head.weight.zero_()
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
        model.lm_head.bias[stop_id] = 50.0
    config = Config()
    policy = Policy(
        model,
        tokenizer,
        version="t",
        model_config=config.model,
        settings=Settings.from_config(config.generation),
        seed=0,
    )
    assert list(policy.stream_tokens(policy.prompt_ids([Turn("user", "hi")]))) == []


def test_clean_reply_strips_template_debris():
    assert clean_reply("  assistant\nSure thing!<|im_end|>junk") == "Sure thing!"
    assert clean_reply("Hi there<|im_start|>user\nmore") == "Hi there"


def test_the_base_model_has_a_version_name_usable_wherever_a_version_is(monkeypatch, tmp_path):
    import bot.policy as policy_module
    from bot.policy import DEFAULT_MODEL_NAME, resolve_model_path

    monkeypatch.setattr(policy_module, "default_model_dir", lambda: tmp_path / "base")
    assert resolve_model_path(DEFAULT_MODEL_NAME) == tmp_path / "base"
    assert resolve_model_path("") == tmp_path / "base"
    # a registered version of that name (an operator's choice) still wins
    mine = {DEFAULT_MODEL_NAME: str(tmp_path / "mine")}
    assert resolve_model_path(DEFAULT_MODEL_NAME, mine) == tmp_path / "mine"


def test_loading_a_folder_that_is_not_a_model_is_one_readable_line(tmp_path):
    with pytest.raises(RapportError, match="not a model folder"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(RapportError, match="cannot load the model"):
        load_model(tmp_path)


def test_int8_serving_quantises_every_linear_layer_and_keeps_the_logits(tiny_model_dir):
    int8 = tiny_policy(tiny_model_dir)  # the default serve_precision
    linears = [m for m in int8.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [] and isinstance(int8.model.lm_head, Int8WeightLinear)
    fp32, _ = load_model(tiny_model_dir)
    ids = torch.tensor([int8.prompt_ids([Turn("user", "hello, how are you?")])])
    with torch.inference_mode():
        exact = fp32(input_ids=ids).logits.float()
        served = int8.model(input_ids=ids).logits.float()
    relative = (served - exact).norm() / exact.norm()
    assert relative < 0.05
    assert int8.reply([Turn("user", "hello")])


@pytest.mark.parametrize("layout", ["input-major", "transposed"])
@pytest.mark.parametrize("real", [False, True], ids=["tiny", "SmolLM2"])
def test_fp32_batch_serving_layouts_keep_the_weights_and_change_no_greedy_reply(
    real, layout, tiny_model_dir, monkeypatch
):
    """The fp32 serving copy for batched work (self-play, eval), in either layout of its
    matmuls (the CPU picks one: ``fp32_layout``), keeps every linear layer's values:
    input-major with the output layer untied from the input embeddings, or the
    transposed products on the layers' own (still tied) weights. Its logits are the
    plain model's for few rows and for many (the transposed layout switches products
    at ``SKINNY_ROWS``), and its greedy replies are token for token the plain model's,
    batched as self-play batches them (8 rows, where the layouts' matmuls differ most)."""
    from learner.simulate import generate_batch

    flags = {"avx512f", "avx2"} if layout == "input-major" else {"avx2"}
    monkeypatch.setattr("bot.policy.cpu_flags", lambda: flags)
    assert fp32_layout() == layout
    folder = default_model_dir() if real else tiny_model_dir
    plain, tokenizer = load_model(folder)
    served = prepare_for_serving(load_model(folder)[0], "fp32")
    tied = served.lm_head.weight.data_ptr() == served.get_input_embeddings().weight.data_ptr()
    pairs = zip(plain.named_modules(), served.named_modules(), strict=True)
    for (name, a), (_, b) in pairs:
        if isinstance(a, torch.nn.Linear):
            assert torch.equal(a.weight, b.weight), name
            if layout == "input-major":
                assert b.weight.stride() == (1, b.weight.shape[0]), name
            else:
                assert isinstance(b, TransposedProductLinear), name
    if layout == "input-major":
        assert not tied
        assert input_major(served) is served  # already input-major: nothing copied again
    else:
        assert tied
    with torch.no_grad():
        for shape in ((8, 1), (2, SKINNY_ROWS)):  # a decoding step, a prefill past the switch
            ids = torch.randint(
                0, plain.config.vocab_size, shape, generator=torch.Generator().manual_seed(0)
            )
            torch.testing.assert_close(served(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-4)
    texts = [
        "Hi! How was your day?",
        "What do you like to do on weekends?",
        "lol",
        "ok",
        "Tell me something interesting.",
        "I'm so tired today.",
        "Do you have pets?",
        "What's your favourite food?",
    ]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    greedy = Settings(temperature=0.0, top_p=1.0, max_new_tokens=16, repetition_penalty=1.0)
    replies = generate_batch(served, tokenizer, prompts, greedy)
    assert replies == generate_batch(plain, tokenizer, prompts, greedy)
    assert len(set(replies)) > 1


def test_a_killed_conversion_never_leaves_a_copy_that_gets_loaded(
    tiny_model_dir, rapport_home, monkeypatch
):
    """Conversion of the default GGUF, with the tiny model standing in for speed."""
    import transformers

    real_model_load = transformers.AutoModelForCausalLM.from_pretrained
    real_tok_load = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM,
        "from_pretrained",
        lambda *a, **k: real_model_load(tiny_model_dir),
    )
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: real_tok_load(tiny_model_dir)
    )
    models = rapport_home / "models"
    # a hard kill (SIGKILL) leaves its temporary folder: it must never be picked up
    debris = models / f".{DEFAULT_MODEL_NAME}-killed"
    debris.mkdir(parents=True)
    (debris / "config.json").write_text("{}")

    real_save = transformers.PreTrainedModel.save_pretrained

    def dies_halfway(self, folder, *a, **k):
        (Path(folder) / "config.json").write_text("{}")
        raise KeyboardInterrupt  # killed while writing the weights

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        default_model_dir()
    assert not (models / DEFAULT_MODEL_NAME).exists()

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", real_save)
    target = default_model_dir()
    assert target == models / DEFAULT_MODEL_NAME
    assert (target / "model.safetensors").exists() and (target / "tokenizer.json").exists()
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", real_model_load)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", real_tok_load)
    model, _ = load_model(target)
    assert model.config.hidden_size == 32
    assert default_model_dir() == target  # cached: no second conversion


@pytest.mark.slow
def test_the_real_default_model_replies_in_english(default_model_home, monkeypatch):
    monkeypatch.setenv("RAPPORT_HOME", str(default_model_home))
    config = Config()
    policy = Policy.load(config.model, config.generation, seed=0)
    assert policy.version == DEFAULT_MODEL_NAME
    reply = policy.reply([Turn("user", "Hi! What do you like to do on weekends?")])
    words = reply.split()
    assert len(words) >= 3
    english = {"i", "you", "the", "to", "a", "and", "my", "it", "is", "like", "do", "of", "in"}
    assert {w.strip(".,!?").lower() for w in words} & english


def test_versions_with_the_same_tokenizer_files_share_one_parsed_tokenizer(
    tiny_model_dir, tmp_path
):
    """Found by bench/soak.py: parsing tokenizer.json in a hot reload held the GIL and
    stalled the Discord bot's event loop for 100-200 ms at every deploy and rollback."""
    import json
    import shutil

    from bot.policy import load_model

    copy = shutil.copytree(tiny_model_dir, tmp_path / "v2")
    assert load_model(copy)[1] is load_model(tiny_model_dir)[1]
    config = copy / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 77}))
    changed = load_model(copy)[1]
    assert changed is not load_model(tiny_model_dir)[1] and changed.model_max_length == 77
