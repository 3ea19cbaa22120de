"""`python -m parallax_lightning generate`: streamed text, deterministic at temperature 0 (equal to
Decoder.generate's greedy output), stop strings and max_new_tokens honored, whole characters only."""

from __future__ import annotations

import pytest
import torch

from parallax_lightning.cli import main
from parallax_lightning.data.tokenizers import ByteTokenizer
from parallax_lightning.generate_cli import TextStream, generate_text, sample_token, stream_tokens

from .checkpoint_utils import letter_decoder, save_checkpoint, tiny_decoder

TOK = ByteTokenizer()


@pytest.mark.parametrize("overrides", [{}, {"attention": "softmax"}, {"window_size": 4}])
def test_streamed_greedy_tokens_equal_decoder_generate(overrides):
    model = tiny_decoder(**overrides)
    prompt = torch.randint(0, 256, (9,))
    streamed = list(stream_tokens(model, prompt.tolist(), max_new_tokens=20, temperature=0.0))
    reference = model.generate(prompt, max_new_tokens=20, temperature=0.0)
    assert streamed == reference[9:].tolist()


def test_stream_stops_at_eos_and_at_max_new_tokens():
    model = tiny_decoder()
    prompt = [1, 2, 3]
    full = list(stream_tokens(model, prompt, 12, temperature=0.0))
    assert len(full) == 12
    eos = full[4]
    stopped = list(stream_tokens(model, prompt, 12, temperature=0.0, eos_id=eos))
    assert stopped == full[: full.index(eos) + 1]
    assert list(stream_tokens(model, prompt, 0)) == []
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=32"):
        list(stream_tokens(model, prompt, 30))


def test_sampling_is_reproducible_with_a_seed_and_top_p_near_zero_is_greedy():
    model = tiny_decoder()
    prompt = [5, 6, 7]

    def sample(seed, **kw):
        gen = torch.Generator().manual_seed(seed)
        return list(stream_tokens(model, prompt, 10, temperature=1.0, generator=gen, **kw))

    assert sample(3, top_p=0.9) == sample(3, top_p=0.9)
    assert sample(3, top_k=5) == sample(3, top_k=5)
    greedy = list(stream_tokens(model, prompt, 10, temperature=0.0))
    assert sample(4, top_p=1e-6) == greedy  # only the most likely token is left
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]])
    draws = {int(sample_token(logits, 1.0, top_p=0.6, generator=torch.Generator().manual_seed(s))) for s in range(50)}
    assert draws == {1, 2}  # 1 alone holds < 0.6 of the mass, 1 and 2 hold more


def test_text_stream_holds_back_partial_characters_and_stop_prefixes():
    stream = TextStream(TOK.decode, stop=["END"])
    pieces = [stream.push(b) for b in "héllo E".encode()]
    # 'é' is two bytes: nothing for the first, the whole character with the second; 'E' may start 'END'
    assert pieces == ["h", "", "é", "l", "l", "o", " ", ""]
    assert stream.push(ord("x")) == "Ex"
    for b in b" EN":
        stream.push(b)
    assert stream.push(ord("D")) == ""
    assert stream.done and stream.text == "héllo Ex "
    assert stream.flush() == ""


def _latest_pair(text: str) -> str:
    """The two characters of text whose first occurrence is latest, so a stop string cuts as far in as the
    text allows. A random model's greedy text can be periodic ('hwhwhw': 'wh' first occurs at 1) or constant
    ('aaaa': the cut is empty), so no fixed position is guaranteed to start a fresh pair."""
    return max((text[k : k + 2] for k in range(len(text) - 1)), key=text.index)


def test_generate_text_honors_stop_strings_and_max_tokens():
    model = letter_decoder()
    free = generate_text(model, TOK, "the quick", 20, temperature=0.0)
    tokens = list(stream_tokens(model, TOK.encode("the quick").tolist(), 20, temperature=0.0))
    assert free == TOK.decode(tokens) and free.isascii()
    assert len(tokens) == 20
    stop = _latest_pair(free)
    pieces: list[str] = []
    cut = generate_text(model, TOK, "the quick", 20, temperature=0.0, stop=[stop], on_text=pieces.append)
    assert cut == free[: free.index(stop)]
    assert "".join(pieces) == cut
    assert generate_text(model, TOK, "the quick", 3, temperature=0.0) == TOK.decode(tokens[:3])


def test_generate_command_prints_the_greedy_continuation(tmp_path, capsys):
    model = letter_decoder()
    ckpt = save_checkpoint(model, tmp_path / "last.ckpt")
    expected = generate_text(model, TOK, "fox", 10, temperature=0.0)
    args = ["generate", "--ckpt_path", str(ckpt), "--prompt", "fox", "--max_new_tokens", "10"]
    for _ in range(2):
        with pytest.raises(SystemExit) as code:
            main(args)
        assert code.value.code == 0
        assert capsys.readouterr().out == expected + "\n"
    stop = _latest_pair(expected)
    with pytest.raises(SystemExit):
        main([*args, "--stop", stop, "zzz"])
    assert capsys.readouterr().out == expected[: expected.index(stop)] + "\n"
    with pytest.raises(SystemExit):
        main([*args, "--temperature", "0.8", "--top_p", "0.9", "--seed", "5"])
    first = capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*args, "--temperature", "0.8", "--top_p", "0.9", "--seed", "5"])
    assert capsys.readouterr().out == first


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max_new_tokens", "40"], "leaves room for 29 new tokens"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top_p", "1.5"], "top_p must lie in (0, 1]"),
        (["--top_k", "0"], "top_k must be a positive integer"),
    ],
)
def test_generate_command_rejects_bad_arguments_by_name(tmp_path, capsys, extra, message):
    ckpt = save_checkpoint(tiny_decoder(), tmp_path / "last.ckpt")
    with pytest.raises(SystemExit) as code:
        main(["generate", "--ckpt_path", str(ckpt), "--prompt", "fox", *extra])
    assert code.value.code == 2
    assert message in capsys.readouterr().err


def test_generate_command_names_a_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as code:
        main(["generate", "--ckpt_path", str(tmp_path / "nope.ckpt"), "--prompt", "x"])
    assert code.value.code == 2
    assert "nope.ckpt" in capsys.readouterr().err
