"""The bad-input catalogue: every entry is one line on stderr naming the problem, exit code 2,
and nothing left in ``--out``. Plus two runs on one run folder end cleanly with one result set."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from circuitdiff.cli import main


def _truncate(src: Path, dst: Path, n_bytes: int) -> Path:
    with src.open("rb") as f:
        dst.write_bytes(f.read(n_bytes))
    return dst


@pytest.fixture()
def corrupt_folder(saved_models, tmp_path):
    base_dir, _ = saved_models
    bad = tmp_path / "corrupt"
    shutil.copytree(base_dir, bad)
    weights = next(bad.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return bad


@pytest.fixture()
def gguf_file(smollm2_path):
    return Path(smollm2_path)


def _run(argv, capsys):
    capsys.readouterr()  # drop what fixtures printed
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def _assert_bad(rc, err, phrase, out: Path | None = None):
    assert rc == 2
    assert len(err) == 1, err  # one line
    assert phrase in err[0], err[0]
    if out is not None:
        assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def evaluate_circuit(key: str):
    """``circuitdiff evaluate`` on the catalogue's circuit file ``key`` and the base model."""
    return lambda c: ["evaluate", "--circuit", c[key], "--model", c["base"], "--out", c["out"]]


def finetune(*extra: str, base: str = "base", out: str = "out"):
    """``circuitdiff organisms finetune`` on the catalogue's model ``base`` into ``out`` (keys of
    the context; ``missing`` names a folder that does not exist), plus ``extra`` options."""
    return lambda c: ["organisms", "finetune", "--kind", "lora", "--base",
                      c["base"] + "-missing" if base == "missing" else c[base],
                      "--out", c[out], *extra]


CATALOGUE = [
    # (id, argv builder(ctx) -> argv, phrase)
    ("data-negative-n", lambda c: ["data", "-n", "-5", "--out", c["out"]], "at least 1"),
    ("knockout-negative-n", lambda c: ["knockout", "-n", "-5", "--out", c["out"]], "at least 1"),
    ("data-1-box", lambda c: ["data", "--n-boxes", "1", "--out", c["out"]], "between 3 and 25"),
    ("data-2-boxes", lambda c: ["data", "--n-boxes", "2", "--out", c["out"]], "between 3 and 25"),
    ("data-26-boxes", lambda c: ["data", "--n-boxes", "26", "--out", c["out"]], "absent"),
    ("knockout-reversed-layers", lambda c: ["knockout", "--layers", "3-1", "-n", "4",
                                            "--out", c["out"]], "write it low-high"),
    ("knockout-no-op-edge", lambda c: ["knockout", "--edge", "correct_object:last", "-n", "4",
                                       "--out", c["out"]], "blocks nothing"),
    ("device-gpu", lambda c: ["eval", "--device", "gpu", "-n", "4"], "unknown device 'gpu'"),
    ("adapter-on-adapter", lambda c: ["eval", "--model", "organism:lora", "--adapter",
                                      c["lora"], "-n", "4"], "is itself a LoRA adapter"),
    ("typo-organism", lambda c: ["eval", "--model", "organsm:base", "-n", "4"],
     "did you mean organism:base"),
    ("unknown-organism", lambda c: ["eval", "--model", "organism:bse", "-n", "4"],
     "unknown organism"),
    ("corrupt-safetensors", lambda c: ["eval", "--model", c["corrupt"], "-n", "4"],
     "truncated or corrupted"),
    ("out-is-a-file", lambda c: ["knockout", "-n", "4", "--out", c["file"]], "is a file"),
    ("circuit-groups-list", lambda c: ["evaluate", "--circuit", c["groups_list"], "--model",
                                       "organism:base", "--out", c["out"]], '"groups" must map'),
    ("circuit-json-array", lambda c: ["evaluate", "--circuit", c["array"], "--model",
                                      "organism:base", "--out", c["out"]], "the JSON is a list"),
    ("circuit-unknown-role", lambda c: ["evaluate", "--circuit", c["bad_role"], "--model",
                                        "organism:base", "--out", c["out"]], "unknown role"),
    ("study-negative-n", lambda c: ["study", "-n", "-5", "--out", c["out"]], "at least 1"),
    ("study-n-mean-0", lambda c: ["study", "--n-mean", "0", "--out", c["out"]], "--n-mean must be at least 1"),
    ("out-read-only", lambda c: ["data", "-n", "4", "--out", "/proc/circuitdiff-test"],
     "not writable"),
    ("study-unknown-step", lambda c: ["study", "--steps", "discover,scna", "--out", c["out"]],
     "unknown step 'scna'; valid steps: accuracy, discover"),
    ("study-out-read-only", lambda c: ["study", "--out", "/proc/circuitdiff-study"],
     "not writable"),
    ("study-dcm-train-0", lambda c: ["study", "--dcm-train", "0", "--out", c["out"]],
     "at least 1"),
    # issue 34: every command's options checked before any model loads
    ("study-random-draws-negative", lambda c: ["study", "--random-draws", "-1", "--out", c["out"]],
     "--random-draws must be at least 0"),
    ("study-1-box", lambda c: ["study", "--n-boxes", "1", "--out", c["out"]], "at least 2"),
    ("study-100-boxes", lambda c: ["study", "--n-boxes", "100", "--out", c["out"]], "at most 26"),
    ("study-target-nan", lambda c: ["study", "--target", "nan", "--out", c["out"]], "finite"),
    ("study-n-discovery-0", lambda c: ["study", "--n-discovery", "0", "--out", c["out"]],
     "--n-discovery must be at least 1"),
    ("study-misspelt-second-model", lambda c: ["study", "--model", c["base"], "--model",
                                               c["base"] + "x", "--out", c["out"]],
     "does not exist"),
    ("study-config-without-sizes", lambda c: ["study", "--model", c["nosizes"], "--out", c["out"]],
     "lacks hidden_size"),
    ("data-out-empty", lambda c: ["data", "-n", "4", "--out", ""], "--out is empty"),
    ("data-100M-prompts", lambda c: ["data", "-n", "100000000", "--out", c["out"]],
     "at most 100000 prompts"),
    ("data-out-name-too-long", lambda c: ["data", "-n", "4", "--out", c["long_name"]],
     "at most 255"),
    ("data-out-path-too-long", lambda c: ["data", "-n", "4", "--out", c["long_path"]],
     "at most 4096"),
    ("data-n-not-a-number", lambda c: ["data", "-n", "ten", "--out", c["out"]],
     "'ten' is not an integer"),
    ("data-model-without-tokenizer", lambda c: ["data", "--model", c["notok"], "-n", "4",
                                                "--out", c["out"]], "has no tokenizer"),
    ("eval-1-box", lambda c: ["eval", "--model", c["base"], "--n-boxes", "1"], "at least 2"),
    ("eval-100-boxes", lambda c: ["eval", "--model", c["base"], "--n-boxes", "100"],
     "at most 26"),
    ("eval-config-without-sizes", lambda c: ["eval", "--model", c["nosizes"], "-n", "4"],
     "lacks hidden_size"),
    ("eval-config-too-big", lambda c: ["eval", "--model", c["huge"], "-n", "4"],
     "memory is available"),
    ("eval-config-layers-four", lambda c: ["eval", "--model", c["four"], "-n", "4"],
     "num_hidden_layers must be a positive integer, got 'four'"),
    ("eval-config-not-json", lambda c: ["eval", "--model", c["badjson"], "-n", "4"],
     "config.json is not JSON"),
    ("eval-adapter-config-not-json", lambda c: ["eval", "--model", c["adapter_badjson"],
                                                "-n", "4"], "adapter_config.json is not JSON"),
    ("eval-adapter-relative-base", lambda c: ["eval", "--model", c["adapter_relbase"], "-n", "4"],
     "base_model_name_or_path '../nowhere' does not exist"),
    ("eval-folder-without-tokenizer", lambda c: ["eval", "--model", c["notok"], "-n", "4"],
     "has no tokenizer"),
    ("eval-adapter-flag-not-adapter", lambda c: ["eval", "--model", c["base"], "--adapter",
                                                 c["empty_dir"], "-n", "4"],
     "holds no adapter_config.json"),
    ("eval-batch-size-0", lambda c: ["eval", "--batch-size", "0"], "at least 1"),
    ("eval-missing-model-path", lambda c: ["eval", "--model", c["base"] + "-missing"],
     "does not exist"),
    ("discover-z-threshold-nan", lambda c: ["discover", "--z-threshold", "nan", "--out", c["out"]],
     "--z-threshold must be a finite number"),
    ("discover-hybrid-k-0", lambda c: ["discover", "--method", "hybrid", "--hybrid-k", "0",
                                       "--out", c["out"]], "--hybrid-k must be at least 1"),
    ("discover-target-inf", lambda c: ["discover", "--target", "inf", "--out", c["out"]],
     "finite"),
    ("discover-target-above-1", lambda c: ["discover", "--target", "2", "--out", c["out"]],
     "target faithfulness must be in (0, 1]"),
    ("discover-n-validate-0", lambda c: ["discover", "--n-validate", "0", "--out", c["out"]],
     "at least 1"),
    ("discover-no-out", lambda c: ["discover"], "--out"),
    ("discover-unknown-method", lambda c: ["discover", "--method", "fast", "--out", c["out"]],
     "invalid choice"),
    ("discover-config-without-sizes", lambda c: ["discover", "--model", c["nosizes"],
                                                 "--out", c["out"]], "lacks hidden_size"),
    ("scan-n-mean-0", lambda c: ["scan", "--n-mean", "0", "--out", c["out"]], "at least 1"),
    ("scan-max-rows-0", lambda c: ["scan", "--max-rows", "0", "--out", c["out"]], "at least 1"),
    ("scan-1-box", lambda c: ["scan", "--n-boxes", "1", "--out", c["out"]], "at least 2"),
    ("scan-folder-without-tokenizer", lambda c: ["scan", "--model", c["notok"], "--out", c["out"]],
     "has no tokenizer"),
    ("evaluate-threshold-nan", lambda c: ["evaluate", "--circuit", c["good"], "--model", c["base"],
                                          "--minimality", "--threshold", "nan", "--out", c["out"]],
     "--threshold must be a finite number"),
    ("evaluate-circuit-is-a-folder", evaluate_circuit("empty_dir"), "is a folder"),
    ("evaluate-circuit-without-heads", evaluate_circuit("no_groups"),
     "has no group with heads"),
    ("evaluate-integer-heads", evaluate_circuit("int_heads"), 'as strings "LAYER.HEAD"'),
    ("evaluate-n-layers-four", evaluate_circuit("four_layers"),
     "n_layers must be a positive integer, got 'four'"),
    ("evaluate-circuit-not-utf8", evaluate_circuit("not_utf8"), "is not UTF-8"),
    ("evaluate-head-out-of-range", evaluate_circuit("out_of_range"),
     "outside its 3 layers x 4 heads"),
    ("evaluate-wrong-head-grid", evaluate_circuit("wrong_grid"), "has 3 x 4"),
    ("evaluate-misspelt-second-model", lambda c: ["evaluate", "--circuit", c["good"], "--model",
                                                  c["base"], "--model", c["base"] + "x",
                                                  "--out", c["out"]], "does not exist"),
    ("evaluate-partner-frac-2", lambda c: ["evaluate", "--circuit", c["good"], "--model", c["base"],
                                           "--max-partner-frac", "2", "--out", c["out"]],
     "at most 1"),
    ("evaluate-no-model", lambda c: ["evaluate", "--circuit", c["good"], "--out", c["out"]],
     "pass at least one --model"),
    ("evaluate-missing-circuit", lambda c: ["evaluate", "--circuit", c["good"] + ".nope",
                                            "--model", c["base"], "--out", c["out"]],
     "does not exist"),
    ("evaluate-out-name-too-long", lambda c: ["evaluate", "--circuit", c["good"], "--model",
                                              c["base"], "--out", c["long_name"]], "at most 255"),
    ("knockout-layers-99", lambda c: ["knockout", "--model", c["base"], "--layers", "99", "-n", "4",
                                      "--out", c["out"]], "has 3 layers"),
    ("knockout-1-box", lambda c: ["knockout", "--n-boxes", "1", "--out", c["out"]], "at least 2"),
    ("knockout-100-boxes", lambda c: ["knockout", "--n-boxes", "100", "--out", c["out"]],
     "at most 26"),
    ("knockout-max-rows-0", lambda c: ["knockout", "--max-rows", "0", "--out", c["out"]],
     "at least 1"),
    ("knockout-layers-garbage", lambda c: ["knockout", "--layers", "x", "-n", "4",
                                           "--out", c["out"]], "is not a list like 0-15"),
    ("organisms-scale-nan", lambda c: ["organisms", "train", "--scale", "nan", "--out", c["out"]],
     "--scale must be a finite number"),
    ("organisms-scale-0", lambda c: ["organisms", "train", "--scale", "0", "--out", c["out"]],
     "greater than 0"),
    ("organisms-no-subcommand", lambda c: ["organisms"], "required"),
    ("organisms-finetune-unknown-kind", finetune("--kind", "full"), "invalid choice: 'full'"),
    ("organisms-finetune-rank-0", finetune("--rank", "0"), "--rank must be at least 1"),
    ("organisms-finetune-steps-0", finetune("--steps", "0"), "--steps must be at least 1"),
    ("organisms-finetune-batch-size-0", finetune("--batch-size", "0"), "at least 1"),
    ("organisms-finetune-n-eval-0", finetune("--n-eval", "0"), "--n-eval must be at least 1"),
    ("organisms-finetune-lr-0", finetune("--lr", "0"), "--lr must be greater than 0"),
    ("organisms-finetune-minutes-negative", finetune("--minutes", "-1"), "greater than 0"),
    ("organisms-finetune-minutes-nan", finetune("--minutes", "nan"), "finite"),
    ("organisms-finetune-out-not-empty", finetune(out="used"), "is not empty"),
    ("organisms-finetune-no-out", lambda c: ["organisms", "finetune", "--base", c["base"],
                                             "--kind", "lora"], "--out"),
    ("organisms-finetune-missing-base", finetune(base="missing"), "does not exist"),
    ("organisms-finetune-base-is-adapter", finetune(base="lora"), "is a LoRA adapter"),
    ("dcm-lambdas-nan", lambda c: ["dcm", "--circuit", c["good"], "--lambdas", "0.01,nan",
                                   "--out", c["out"]], "--lambdas"),
    ("dcm-lr-0", lambda c: ["dcm", "--circuit", c["good"], "--lr", "0", "--out", c["out"]],
     "greater than 0"),
    ("dcm-tolerance-nan", lambda c: ["dcm", "--circuit", c["good"], "--tolerance", "nan",
                                     "--out", c["out"]], "finite"),
    ("dcm-1-box", lambda c: ["dcm", "--circuit", c["good"], "--n-boxes", "1", "--out", c["out"]],
     "at least 2"),
    ("dcm-circuit-without-heads", lambda c: ["dcm", "--circuit", c["no_groups"], "--model",
                                             c["base"], "--out", c["out"]], "has no group with heads"),
    ("dcm-circuit-is-a-folder", lambda c: ["dcm", "--circuit", c["empty_dir"], "--model",
                                           c["base"], "--out", c["out"]], "is a folder"),
    ("cmap-random-draws-negative", lambda c: ["cmap", "--circuit", c["good"], "--base", c["base"],
                                              "--finetuned", c["lora"], "--random-draws", "-1",
                                              "--out", c["out"]], "at least 0"),
    ("cmap-bootstrap-negative", lambda c: ["cmap", "--circuit", c["good"], "--base", c["base"],
                                           "--finetuned", c["lora"], "--bootstrap", "-1",
                                           "--out", c["out"]], "at least 0"),
    ("cmap-1-box", lambda c: ["cmap", "--circuit", c["good"], "--base", c["base"], "--finetuned",
                              c["lora"], "--n-boxes", "1", "--out", c["out"]], "at least 2"),
    ("cmap-n-nan", lambda c: ["cmap", "--circuit", c["good"], "--base", c["base"], "--finetuned",
                              c["lora"], "-n", "nan", "--out", c["out"]], "not an integer"),
    ("cmap-wrong-head-grid", lambda c: ["cmap", "--circuit", c["wrong_grid"], "--base", c["base"],
                                        "--finetuned", c["lora"], "--out", c["out"]], "has 3 x 4"),
    ("cmap-misspelt-finetuned", lambda c: ["cmap", "--circuit", c["good"], "--base", c["base"],
                                           "--finetuned", c["lora"] + "x", "--out", c["out"]],
     "does not exist"),
    ("models-fetch-unknown", lambda c: ["models", "fetch", "no-such-checkpoint"],
     "unknown checkpoint"),
    ("models-no-subcommand", lambda c: ["models"], "required"),
    ("unknown-command", lambda c: ["discovr"], "invalid choice"),
]


CIRCUITS = {  # circuit files of the catalogue (the saved tiny base is 3 layers x 4 heads)
    "groups_list": '{"n_layers": 4, "n_heads": 8, "groups": [["1.0"]]}',
    "array": "[1, 2]",
    "bad_role": '{"n_layers": 4, "n_heads": 8, "groups": {"a": {"position": '
                '"nowhere", "heads": ["1.0"]}}}',
    "good": '{"n_layers": 3, "n_heads": 4, "groups": {"a": {"position": "last", '
            '"heads": ["1.0", "2.3"]}}}',
    "no_groups": '{"n_layers": 3, "n_heads": 4, "groups": {}}',
    "int_heads": '{"n_layers": 3, "n_heads": 4, "groups": {"a": {"position": "last", '
                 '"heads": [1, 2]}}}',
    "four_layers": '{"n_layers": "four", "n_heads": 4, "groups": {"a": {"position": "last", '
                   '"heads": ["1.0"]}}}',
    "out_of_range": '{"n_layers": 3, "n_heads": 4, "groups": {"a": {"position": "last", '
                    '"heads": ["7.0"]}}}',
    "wrong_grid": '{"n_layers": 4, "n_heads": 8, "groups": {"a": {"position": "last", '
                  '"heads": ["1.0"]}}}',
}


def _model_variants(base: Path, lora: Path, root: Path) -> dict[str, str]:
    """Broken copies of the saved tiny models (config.json and adapter_config.json edited)."""
    import json

    def copy(src: Path, name: str, edit=None, drop=()) -> str:
        dst = root / name
        shutil.copytree(src, dst)
        for f in drop:
            (dst / f).unlink()
        if edit is not None:
            edit(dst)
        return str(dst)

    def set_cfg(text):
        return lambda d: (d / "config.json").write_text(text)

    cfg = json.loads((base / "config.json").read_text())
    huge = {**cfg, "hidden_size": 65536, "intermediate_size": 262144, "num_hidden_layers": 200,
            "num_attention_heads": 512, "num_key_value_heads": 512, "head_dim": 128}
    acfg = json.loads((lora / "adapter_config.json").read_text())
    return {
        "nosizes": copy(base, "nosizes", set_cfg('{"model_type": "llama"}')),
        "huge": copy(base, "huge", set_cfg(json.dumps(huge))),
        "four": copy(base, "four", set_cfg(json.dumps({**cfg, "num_hidden_layers": "four"}))),
        "badjson": copy(base, "badjson", set_cfg('{"model_type": "llama",')),
        "notok": copy(base, "notok", drop=("tokenizer.json", "tokenizer_config.json")),
        "adapter_badjson": copy(lora, "adapter_badjson", lambda d: (
            d / "adapter_config.json").write_text("r: 4\nalpha: 8\n")),
        "adapter_relbase": copy(lora, "adapter_relbase", lambda d: (
            d / "adapter_config.json").write_text(json.dumps(
                {**acfg, "base_model_name_or_path": "../nowhere"}))),
    }


@pytest.fixture(scope="module")
def catalogue_models(tokenizer, tmp_path_factory):
    """The saved tiny models, their broken copies and a corrupted copy: made once for the
    catalogue (no case writes into them)."""
    from conftest import save_base_and_lora

    root = tmp_path_factory.mktemp("catalogue_models")
    base, lora = save_base_and_lora(tokenizer, root)
    bad = root / "corrupt"
    shutil.copytree(base, bad)
    weights = next(bad.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return base, lora, bad, _model_variants(base, lora, root)


@pytest.mark.parametrize("case", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input(case, tmp_path, capsys, catalogue_models, monkeypatch):
    """Each case: exit code 2, one line naming the problem, nothing written; before any
    model loads (the whole catalogue runs in seconds)."""
    _, build, phrase = case
    work = tmp_path / "cwd"  # a default --out (runs/<command>) would land here
    work.mkdir()
    monkeypatch.chdir(work)
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("not a folder")
    for name, text in CIRCUITS.items():
        (tmp_path / f"{name}.json").write_text(text)
    (tmp_path / "not_utf8.json").write_bytes(b'{"n_layers": 3, "model": "\xff\xfe"}')
    (tmp_path / "empty_dir").mkdir()
    used = tmp_path / "used"  # a folder holding an earlier result
    used.mkdir()
    (used / "finetune.json").write_text("{}")
    base, lora, corrupt_folder, variants = catalogue_models
    ctx = {"out": str(tmp_path / "out"), "lora": str(lora), "base": str(base),
           **{name: str(tmp_path / f"{name}.json") for name in [*CIRCUITS, "not_utf8"]},
           **variants,
           "empty_dir": str(tmp_path / "empty_dir"),
           "long_name": str(tmp_path / "out" / ("n" * 300)),
           "long_path": str(tmp_path / "out" / "/".join(["p" * 200] * 21)),
           "corrupt": str(corrupt_folder), "file": str(a_file), "used": str(used)}
    rc, err = _run(build(ctx), capsys)
    _assert_bad(rc, err, phrase, tmp_path / "out")
    assert a_file.read_text() == "not a folder"
    assert not list(work.iterdir()), list(work.iterdir())
    assert not list((tmp_path / "empty_dir").iterdir())
    assert [f.name for f in used.iterdir()] == ["finetune.json"]


def test_catalogue_covers_every_command():
    from circuitdiff.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    ids = [c[0] for c in CATALOGUE]
    assert len(ids) >= 60 and len(set(ids)) == len(ids)
    for name in sub.choices:
        assert any(i.startswith(name) for i in ids), f"no bad-input case for {name}"


def test_config_without_sizes_fails_fast(saved_models, tmp_path):
    """A config.json of only {"model_type": "llama"} beside real weights once built a full-size
    Llama (killed at 19.8 GB); it is refused from the config, in seconds, naming the field."""
    import time

    base, lora = saved_models
    folder = _model_variants(base, lora, tmp_path)["nosizes"]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "circuitdiff", "eval", "--model", folder,
                           "-n", "4"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    seconds = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    assert "lacks hidden_size" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert seconds < 10, seconds


def test_memory_estimate_matches_a_real_model(saved_models):
    """The parameter count estimated from config.json is the built model's, within 5%."""
    from safetensors import safe_open

    from circuitdiff.core.validate import config_sizes, estimate_params

    base, _ = saved_models
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        real = sum(f.get_tensor(k).numel() for k in f.keys())
    est = estimate_params(config_sizes(base / "config.json"))
    assert abs(est - real) / real < 0.05, (est, real)


@pytest.mark.parametrize("n_bytes", [1024, 20_000_000], ids=["1KB", "20MB"])
def test_truncated_gguf(gguf_file, tmp_path, capsys, n_bytes):
    bad = _truncate(gguf_file, tmp_path / "bad.gguf", n_bytes)
    rc, err = _run(["eval", "--model", str(bad), "-n", "4"], capsys)
    _assert_bad(rc, err, "truncated")


def test_unreachable_hub_id_fails_at_once(monkeypatch, capsys):
    import time

    import circuitdiff.core.specs as specs

    monkeypatch.setattr(specs, "hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    rc, err = _run(["eval", "--model", "someone/no-such-model-xyz", "-n", "4"], capsys)
    _assert_bad(rc, err, "cannot be reached")
    assert "organism:base" in err[0]
    assert time.perf_counter() - start < 10
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.undo()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert specs.hub_reachable() is False


@pytest.mark.slow  # two CLI processes racing (~15 s)
def test_two_runs_on_one_folder_end_cleanly(saved_models, tmp_path):
    """Started together on one --out: the second waits for the lock, then resumes from the
    first's results; both exit 0 and the folder holds one result set and no temp files."""
    base_dir, _ = saved_models
    out = tmp_path / "shared"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "circuitdiff", "knockout", "--model", str(base_dir),
           "--n-boxes", "3", "-n", "6", "--out", str(out), "--quiet"]
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    results = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert not [r for r in results if r.endswith(".tmp")], results
    assert sum(r.endswith("curves.json") for r in results) == 1, results


@pytest.mark.slow  # two CLI processes, one waiting (~15 s)
def test_a_run_waits_for_the_lock(saved_models, tmp_path):
    """While another run holds the folder, a new run waits (says so, writes nothing) and then
    finishes once the folder is free."""
    import time

    from circuitdiff.core.runs import open_run_folder

    base_dir, _ = saved_models
    out = tmp_path / "held"
    cmd = [sys.executable, "-m", "circuitdiff", "knockout", "--model", str(base_dir),
           "--n-boxes", "3", "-n", "4", "--out", str(out), "--quiet"]
    with open_run_folder(out):
        proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stderr=subprocess.PIPE, text=True)
        time.sleep(8)
        assert proc.poll() is None  # still waiting
        assert not list(out.rglob("*.json"))
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 0, err
    assert "waiting for it to finish" in err
    assert list(out.rglob("curves.json"))


def test_lock_refuses_when_asked_not_to_wait(tmp_path):
    from circuitdiff.core.runs import RunFolderError, open_run_folder

    with open_run_folder(tmp_path / "r"):
        with pytest.raises(RunFolderError, match="another circuitdiff run"):
            with open_run_folder(tmp_path / "r", wait=False):
                pass
    with open_run_folder(tmp_path / "r", wait=False):  # released after the first block
        pass


def test_version_and_common_options(capsys):
    assert main(["--version"]) == 0 and "circuitdiff" in capsys.readouterr().out
    from circuitdiff.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        opts = p._option_string_actions
        if name != "organisms":
            assert {"--threads", "--json", "--quiet"} <= set(opts), name
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help text"


def test_the_cli_method_choices_are_the_methods_own():
    """The CLI spells the scoring methods without importing a method; they must stay the
    scan's and discovery's."""
    from circuitdiff.cli import METHOD_CHOICES
    from circuitdiff.methods.discovery.config import METHODS
    from circuitdiff.methods.scan import SCAN_METHODS

    assert METHOD_CHOICES == SCAN_METHODS == METHODS
