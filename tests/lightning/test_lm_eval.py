"""lm-evaluation-harness adapter and `python -m parallax_lightning eval`.

The rolling log-likelihood (lm-eval's perplexity) equals the platform's own validation loss on the same text;
windows never exceed max_length and predict every token once; loglikelihood and generate_until agree with
the model's forward and greedy decoding; `eval` logs eval/<task>/<metric> into the checkpoint's FINISHED run
without changing its status (local tasks from tests/data/lm_eval_tasks, no network)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from parallax_lightning.cli import main
from parallax_lightning.data.sampling import EvalBatches, TokenWindows
from parallax_lightning.data.tokenizers import ByteTokenizer
from parallax_lightning.export import load_model, load_pretrained
from parallax_lightning.generate_cli import generate_text
from parallax_lightning.lm_eval_adapter import ParallaxLM
from parallax_lightning.lm_module import LanguageModelModule

from .checkpoint_utils import letter_decoder, save_checkpoint, tiny_decoder
from .platform_utils import WORDS, mlflow_client, only_run, run_cli, single_thread, tiny_config

TOK = ByteTokenizer()
TASKS = Path(__file__).resolve().parents[1] / "data" / "lm_eval_tasks"


def requests(*args):
    return [SimpleNamespace(args=a) for a in args]


def text_of(n_bytes: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    text = ""
    while len(text) < n_bytes:
        text += WORDS[rng.integers(len(WORDS))] + " "
    return text[:n_bytes]


def platform_validation_loss(model, tokens: list[int], seq_len: int) -> tuple[float, int]:
    """The platform's validation loss (token-weighted mean of LanguageModelModule.compute_loss over the
    validation windows) of one document after an end-of-text token."""
    module = LanguageModelModule(model=model.config)
    module.model.load_state_dict(model.state_dict())
    module.eval()
    windows = TokenWindows([np.asarray([TOK.eos_id, *tokens], dtype=np.int64)], seq_len)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in EvalBatches(windows, batch_size=2):
            loss, _, n = module.compute_loss(batch)
            total += float(loss) * int(n)
            count += int(n)
    return total / count, count


@pytest.mark.parametrize("overrides", [{}, {"attention": "softmax"}, {"window_size": 6}, {"attention": "lla"}])
def test_rolling_perplexity_equals_platform_validation_loss(overrides):
    model = tiny_decoder(**overrides)
    L = model.config.max_seq_len
    text = text_of(3 * L)  # [eos] + 3L tokens: three full validation windows, every token predicted once
    tokens = TOK.encode(text).tolist()
    val_loss, count = platform_validation_loss(model, tokens, L)
    assert count == len(tokens)
    lm = ParallaxLM.from_model(model, TOK, batch_size=2)
    (loglik,) = lm.loglikelihood_rolling(requests((text,)))
    nll = -loglik / len(tokens)
    print(f"rolling NLL {nll:.8f} vs validation loss {val_loss:.8f}: |diff| = {abs(nll - val_loss):.2e} nats/token")
    assert abs(nll - val_loss) < 1e-4
    assert math.isclose(math.exp(nll), math.exp(val_loss), rel_tol=1e-4)  # the perplexities


@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 64, 75])
def test_rolling_windows_predict_every_token_once_within_max_length(n):
    model = tiny_decoder(window_size=6)
    lm = ParallaxLM.from_model(model, TOK, batch_size=3)
    tokens = TOK.encode(text_of(n, seed=n)).tolist()
    windows = lm.rolling_windows(tokens)
    assert [t for _, targets in windows for t in targets] == tokens
    stream = [TOK.eos_id, *tokens]
    done = 0
    for inp, targets in windows:
        assert len(targets) <= len(inp) <= model.config.max_seq_len
        # the input is the stretch of the stream right before the last target: targets are stream[done+1 : stop+1]
        stop = done + len(targets)
        assert inp == stream[stop - len(inp) : stop]
        done = stop
    # batched and padded scoring equals one forward per window
    (batched,) = lm.loglikelihood_rolling(requests((TOK.decode(tokens),)))
    single = 0.0
    with torch.no_grad():
        for inp, targets in windows:
            logp = F.log_softmax(model(torch.tensor([inp])).float()[0], -1)
            single += float(logp[len(inp) - len(targets) :].gather(-1, torch.tensor(targets)[:, None]).sum())
    assert batched == pytest.approx(single, abs=1e-4)


def test_max_length_shorter_than_the_model_is_respected():
    model = tiny_decoder()
    lm = ParallaxLM.from_model(model, TOK, max_length=8)
    assert all(len(inp) <= 8 for inp, _ in lm.rolling_windows(list(range(50))))
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=32"):
        ParallaxLM.from_model(model, TOK, max_length=33)


def test_loglikelihood_equals_the_forward_and_reports_greedy():
    # relative tolerances: this model's log-probabilities are large (tens of nats), fp32 rounding scales with them
    model = letter_decoder()  # its greedy text is ASCII: decoding and re-encoding it gives the same tokens
    lm = ParallaxLM.from_model(model, TOK, batch_size=2)
    context = "the quick brown"
    greedy = generate_text(model, TOK, context, 3, temperature=0.0)
    (a, a_greedy), (_, b_greedy), (c, _), (d, _) = lm.loglikelihood(
        requests((context, " fox"), (context, greedy), (context + " ", "fox"), ("", "fox"))
    )
    ids = TOK.encode(context + " fox").tolist()
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids[:-1]])).float()[0], -1)
    n = len(TOK.encode(" fox"))
    expected = float(logp[-n:].gather(-1, torch.tensor(ids[-n:])[:, None]).sum())
    assert a == pytest.approx(expected, rel=1e-5)
    assert c == pytest.approx(a, rel=1e-5)  # the context's trailing space moves to the continuation
    assert b_greedy and not (a_greedy and greedy != " fox")
    with torch.no_grad():
        logp0 = F.log_softmax(model(torch.tensor([[TOK.eos_id, *TOK.encode("fo").tolist()]])).float()[0], -1)
    assert d == pytest.approx(
        float(logp0.gather(-1, torch.tensor(TOK.encode("fox").tolist())[:, None]).sum()), rel=1e-5
    )
    # a context longer than the model keeps its last tokens: 33 = L + 1 of context and continuation
    long = text_of(100).rstrip() + "x"
    (e, _), (f, _) = lm.loglikelihood(requests((long, " fox"), (long[-29:], " fox")))
    assert e == pytest.approx(f, rel=1e-5)


def test_generate_until_is_greedy_and_stops_at_until():
    model = letter_decoder()
    lm = ParallaxLM.from_model(model, TOK, max_gen_toks=12)
    free = generate_text(model, TOK, "fox", 12, temperature=0.0)
    stop = next(free[k] for k in range(2, len(free)) if free.index(free[k]) == k)
    out = lm.generate_until(requests(("fox", {"until": ["zzz"]}), ("fox", {"until": [stop], "max_gen_toks": 12})))
    assert out == [free, free[: free.index(stop)]]
    (short,) = lm.generate_until(requests(("fox", {"until": [], "max_gen_toks": 4})))
    assert short == free[:4]


# ------------------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus, store):
    """A checkpoint from a real (3-step) `fit`, its run FINISHED."""
    folder = tmp_path_factory.mktemp("fit")
    config = tiny_config(folder, corpus, experiment="eval_cmd", store=store, trainer={"max_steps": 3})
    with single_thread():
        run_cli(["fit", "--config", str(config)], folder)
    (ckpt,) = sorted(folder.glob("runs/**/last.ckpt"))
    return ckpt


@pytest.fixture
def offline_hf(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.chdir(TASKS)  # the task files name their data relative to this folder


def run_main(args) -> int:
    with pytest.raises(SystemExit) as code:
        main(args)
    return code.value.code


def test_eval_logs_task_metrics_into_the_finished_training_run(trained, store, offline_hf, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    client = mlflow_client(store)
    run = only_run(client, "eval_cmd")
    assert run.info.status == "FINISHED"
    args = ["eval", "--ckpt_path", str(trained), "--include_path", str(TASKS), "--batch_size", "4"]
    code = run_main(
        [
            *args,
            "--tasks",
            "tiny_choice",
            "tiny_text",
            "tiny_generate",
            "--limit",
            "3",
            "--output",
            str(tmp_path / "r.json"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    after = client.get_run(run.info.run_id)
    assert after.info.status == "FINISHED" and after.info.end_time == run.info.end_time
    metrics = after.data.metrics
    for key in ("eval/tiny_choice/acc", "eval/tiny_choice/acc_norm", "eval/tiny_text/word_perplexity"):
        assert key in metrics, sorted(metrics)
    assert "eval/tiny_text/bits_per_byte" in metrics and "eval/tiny_generate/exact_match" in metrics
    assert 0 <= metrics["eval/tiny_choice/acc"] <= 1
    step = torch.load(trained, weights_only=True)["global_step"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/tiny_choice/acc")] == [step]
    assert (tmp_path / "r.json").is_file()
    # what each number stands on: --limit 3 cut tiny_choice's four documents
    assert after.data.tags["parallax.eval.tiny_choice.samples"] == "3 of 4"
    assert after.data.tags["parallax.eval.tiny_text.samples"] == "2 of 2"
    assert "eval/tiny_choice/acc\t" in capsys.readouterr().out
    # the bits per byte lm-eval reports is the adapter's rolling log-likelihood over the task's bytes
    lm = ParallaxLM.from_model(load_model(trained).model, TOK)
    texts = [json.loads(line)["text"] for line in (TASKS / "tiny_text.jsonl").read_text().splitlines() if line]
    loglik = sum(lm.loglikelihood_rolling(requests(*[(t,) for t in texts])))
    n_bytes = sum(len(t.encode()) for t in texts)
    assert metrics["eval/tiny_text/bits_per_byte"] == pytest.approx(-loglik / n_bytes / math.log(2), rel=1e-5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tasks", "no_such_task"], "unknown lm-eval task(s) ['no_such_task']"),
        (["--tasks", "tiny_choice", "--run_id", "0" * 32], "is not in sqlite"),
        (["--tasks", "tiny_choice", "--limit", "0"], "--limit must be positive"),
    ],
)
def test_eval_rejects_bad_input_before_evaluating(trained, store, offline_hf, capsys, extra, message):
    pytest.importorskip("lm_eval")
    client = mlflow_client(store)
    run = only_run(client, "eval_cmd")
    before = dict(client.get_run(run.info.run_id).data.metrics)
    code = run_main(["eval", "--ckpt_path", str(trained), "--include_path", str(TASKS), *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert client.get_run(run.info.run_id).data.metrics == before


def test_export_and_generate_work_on_a_trained_checkpoint(trained, tmp_path, capsys):
    assert run_main(["export", "--ckpt_path", str(trained), "--out", str(tmp_path / "m")]) == 0
    original = load_model(trained).model
    ids = torch.randint(0, 257, (2, original.config.max_seq_len))
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path / "m")(ids), original(ids))
    capsys.readouterr()
    outputs = []
    for source in (trained, tmp_path / "m"):
        assert run_main(["generate", "--ckpt_path", str(source), "--prompt", "the", "--max_new_tokens", "8"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] == generate_text(original, TOK, "the", 8) + "\n"


def test_lm_eval_finds_the_registered_model_by_name(tmp_path, offline_hf):
    """`simple_evaluate(model="parallax", model_args="pretrained=...")`: the registration and lm-eval's string
    arguments reach the adapter; unknown arguments are refused by name."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    assert get_model("parallax") is ParallaxLM
    ckpt = save_checkpoint(tiny_decoder(), tmp_path / "c.ckpt")
    out = lm_eval.simple_evaluate(
        model="parallax",
        model_args=f"pretrained={ckpt},tokenizer=byte,dtype=float32,max_length=16",
        tasks=["tiny_choice"],
        batch_size=2,
        limit=2,
        task_manager=TaskManager(include_path=str(TASKS)),
    )
    assert 0 <= out["results"]["tiny_choice"]["acc,none"] <= 1
    with pytest.raises(ValueError, match=r"unknown model_args \['temprature'\]"):
        ParallaxLM.create_from_arg_string(f"pretrained={ckpt},temprature=0")
