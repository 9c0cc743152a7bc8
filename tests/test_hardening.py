"""Hostile and careless input stops with one line naming the file, row or key and what was expected,
and a non-zero exit, before any work: resource limits, parsing limits, silent coercions, the data
of ``moe-theory fit``, and failures that used to end in a traceback. One table per kind of input;
every case runs in-process through :func:`moe_theory.cli.main` on tiny inputs, and none compiles a
sweep."""

import contextlib
import io
import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

from moe_theory import cli, storage
from moe_theory.config import ConfigError, load_config
from moe_theory.resources import (
    BASELINE_BYTES,
    ResourceError,
    check_study,
    estimate_study,
    parse_memory_size,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMOKE = CONFIGS / "smoke.yaml"
PREFIX = "moe-theory: error: "


def run_cli(*arguments):
    """(status, stdout, stderr) of an in-process command; a ``SystemExit`` (``fit``'s refusals,
    ``--version``) gives its code, or 1 and its message on stderr, as the interpreter would."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in arguments])
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
            if isinstance(stop.code, str):
                print(stop.code, file=sys.stderr)
    return code, out.getvalue(), err.getvalue()


def assert_refused(code, err, expected, status=2):
    """One line on stderr, starting with the prefix and holding ``expected``; no traceback."""
    assert code == status, err
    assert err.startswith(PREFIX) and err.count("\n") == 1, err
    assert expected in err, err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------------------------
# Config values refused at parse time: absurd sizes, silent coercions, wrong types.

CONFIG_REFUSALS = [
    ("sample_sizes=[1e9]", "sample_sizes[0]: expected a number ≤ 1e+08, got '1e9'"),
    ("replicates=1e8", "replicates: expected an integer ≤ 1000000, got '1e8'"),
    ("sweep.bucket_growth=1e308", "sweep.bucket_growth: expected a number ≤ 100, got '1e308'"),
    ("sweep.batch_size=1e9", "sweep.batch_size: expected an integer ≤ 1000000"),
    ("fit.max_iter=1e12", "fit.max_iter: expected an integer ≤ 2147483647"),
    ("sample_sizes={linspace: [2, 10, 1e8]}", "sample_sizes.linspace[2]: expected an integer ≤ 10000, got '1e8'"),
    ("sample_sizes={geomspace: [2, 1e6, 20000]}", "sample_sizes.geomspace[2]: expected an integer ≤ 10000"),
    ("sample_sizes=[{linspace: [2, 10, 6000]}, {linspace: [20, 1e5, 6000]}]",
     "sample_sizes: expands to more than 10000 sample sizes"),
    ("model.dim=0", "model.dim: expected an integer ≥ 1, got 0"),
    ("model.num_experts=2.7", "model.num_experts: expected an integer, got 2.7 (float)"),
    ("model.num_experts=true", "model.num_experts: expected a number, got True (bool)"),
    ("inputs={name: normal, std: 0}", "inputs.std: expected a standard deviation > 0 in every coordinate, got 0.0"),
    ("inputs={name: grid, low: 0.5, high: 0.5}", "inputs.high: expected high ≠ low in every coordinate"),
    ("inputs={name: uniform, low: 2, high: 2}", "inputs.high: expected high ≠ low in every coordinate"),
    ("seed=9223372036854775808", "seed: expected a seed below 2^63"),
    ("name=" + "a" * 300, "name: expected a name of at most 100 characters, got 300"),
    ("name=../escape", "name: expected a folder-safe name"),
    ("rates.compare=[{metric: D1, setting: [a], quantity: b}]",
     "rates.compare[0].setting: expected a non-empty string, got ['a'] (list)"),
]


@pytest.mark.parametrize("override, expected", CONFIG_REFUSALS, ids=[case[0][:40] for case in CONFIG_REFUSALS])
def test_bad_config_values_are_refused_with_the_key(tmp_path, override, expected):
    code, _, err = run_cli("run", SMOKE, "--set", override, "--out", tmp_path, "--no-compile-cache")
    assert_refused(code, err, expected)
    assert f"{SMOKE} (set by --set" in err
    assert not any(tmp_path.iterdir()), "nothing may be created for a refused config"


def test_an_alias_in_a_set_value_is_refused(tmp_path):
    code, _, err = run_cli("run", SMOKE, "--set", "fit.tol=[&x 1, *x]", "--out", tmp_path, "--no-compile-cache")
    assert_refused(code, err, "--set 'fit.tol=[&x 1, *x]': YAML alias *x is not allowed in a config")


def test_the_largest_seed_jax_accepts_still_loads(tmp_path):
    assert load_config(SMOKE, [f"seed={2**63 - 1}"]).seed == 2**63 - 1


# ----------------------------------------------------------------------------------------------
# Config files that would exhaust memory or the stack while being read.

BILLION_LAUGHS = "name: bomb\n" + "".join(
    f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * 10) if level else ', '.join(['lol'] * 10)}]\n"
    for level in range(9)
)

CONFIG_FILES = [
    ("billion_laughs", BILLION_LAUGHS.encode(), ":3: YAML alias *l0 is not allowed in a config"),
    ("self_reference", b"name: loop\nfit: &a {num_experts: *a}\n", ":2: YAML alias *a is not allowed in a config"),
    ("not_utf8", b"name: caf\xe9\n", ": not UTF-8 text (byte 0xe9 at offset 9); expected a YAML config"),
    ("deep_nesting", b"[" * 5000, ": the YAML is nested too deeply to read"),
    ("too_large", b"#" * (1 << 20) + b"\n", ": 1048577 bytes; expected a YAML config of at most 1048576 bytes"),
]


@pytest.mark.parametrize("name, content, expected", CONFIG_FILES, ids=[case[0] for case in CONFIG_FILES])
def test_hostile_config_files_are_refused_naming_the_file(tmp_path, name, content, expected):
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(content)
    code, _, err = run_cli("run", path, "--out", tmp_path / "results", "--no-compile-cache")
    assert_refused(code, err, f"{path}{expected}")


def test_list_survives_a_hostile_config_in_the_configs_folder(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "bomb.yaml").write_text(BILLION_LAUGHS)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("list")
    assert code == 0, err
    assert "bomb.yaml" in out and "(not readable: line 3: YAML alias *l0 is not allowed" in out
    assert "quickstart.yaml" in out


# ----------------------------------------------------------------------------------------------
# The memory plan, refused before anything compiles.

MEMORY_REFUSALS = [
    (["sample_sizes=[1e7]"], "4G",
     "sample_sizes: its largest cell (k=3, n = 10000000 padded to 16777216, 2 fit(s) per program call"),
    (["sample_sizes=[1e6]", "sweep.batch_size=512"], "4G", "sweep.batch_size: its largest cell"),
    (["replicates=1e6"], "4G", "replicates: the results of its 6000000 fits need about"),
]


@pytest.mark.parametrize("overrides, limit, expected", MEMORY_REFUSALS, ids=["sample_sizes", "batch_size", "replicates"])
def test_a_plan_larger_than_memory_is_refused_naming_the_key(tmp_path, overrides, limit, expected):
    arguments = [item for override in overrides for item in ("--set", override)]
    code, _, err = run_cli("run", SMOKE, *arguments, "--memory-limit", limit, "--out", tmp_path, "--no-compile-cache")
    assert_refused(code, err, expected)
    assert "more than the 4.0 GiB of --memory-limit" in err and "or pass --allow-large to run anyway" in err
    assert not any(tmp_path.iterdir())


def test_the_suggested_batch_size_fits_and_allow_large_overrides():
    config = load_config(SMOKE, ["sample_sizes=[1e6]", "sweep.batch_size=512"])
    limit = 4 << 30
    with pytest.raises(ResourceError, match=r"expected sweep.batch_size ≤ (\d+)") as refused:
        check_study(config, limit=limit, devices=1)
    suggested = int(str(refused.value).split("sweep.batch_size ≤ ")[1].split(";")[0])
    assert suggested >= 1
    assert check_study(load_config(SMOKE, ["sample_sizes=[1e6]", f"sweep.batch_size={suggested}"]), limit=limit,
                       devices=1) is None
    warning = check_study(config, limit=limit, allow_large=True, devices=1)
    assert "sweep.batch_size: its largest cell" in warning and warning.endswith("running anyway (--allow-large)")


def test_the_estimate_grows_with_every_size_it_names():
    base = estimate_study(load_config(SMOKE, ["sample_sizes=[1000]"]))
    for override in ("sample_sizes=[100000]", "sweep.batch_size=8", "fit.n_init=3", "fit.num_experts=[2, 4]",
                     "fit.gate_steps=2", "fit.method=mle"):
        grown = estimate_study(load_config(SMOKE, ["sample_sizes=[1000]", override]))
        assert grown.peak.device_bytes > base.peak.device_bytes > BASELINE_BYTES, override
    assert estimate_study(load_config(SMOKE, ["sample_sizes=[1000]", "replicates=30"])).host_bytes == 10 * base.host_bytes


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("paper1_*.yaml")) + [CONFIGS / "quickstart.yaml"],
                         ids=lambda p: p.name)
def test_shipped_studies_fit_in_8_gib(path):
    """Nothing valid is lost: the paper-1 studies and the quickstart run on an 8 GiB machine."""
    assert check_study(load_config(path), limit=8 << 30, devices=1) is None


@pytest.mark.parametrize("text, expected", [("8G", 8 << 30), ("512M", 512 << 20), ("1.5GiB", 3 << 29), ("4096", 4096)])
def test_memory_sizes_parse(text, expected):
    assert parse_memory_size(text) == expected


def test_a_bad_memory_limit_is_refused(tmp_path):
    code, _, err = run_cli("run", SMOKE, "--memory-limit", "lots", "--out", tmp_path, "--no-compile-cache")
    assert_refused(code, err, "--memory-limit: expected a size like 8G, 512M or a number of bytes, got 'lots'")


# ----------------------------------------------------------------------------------------------
# moe-theory fit --data.

GOOD_ROWS = "".join(f"{i / 40:.3f},{np.sin(i):.4f}\n" for i in range(40))

FIT_REFUSALS = [
    ("infinite_x", "x1,y\n0.1,1\n0.2,2\ninf,3\n" + GOOD_ROWS, [], "line 4, column x1: 'inf' is infinite"),
    ("minus_infinite_y", "x1,y\n0.1,1\n0.2,-inf\n" + GOOD_ROWS, [], "line 3, column y: '-inf' is infinite"),
    ("nan", "x1,y\n0.1,1\n0.2,NaN\n" + GOOD_ROWS, [], "line 3, column y: missing value"),
    ("empty_cell", "x1,y\n0.1,1\n,2\n" + GOOD_ROWS, [], "line 3, column x1: missing value"),
    ("text_in_x", "x1,y\n0.1,1\nabc,2\n" + GOOD_ROWS, [], "line 3, column x1: 'abc' is not a number"),
    ("text_in_class", "x1,y\n0.1,0\n0.2,cat\n" + GOOD_ROWS.replace(".", "1").replace("-", ""),
     ["--expert", "multinomial_logistic", "--num-classes", "2"], "line 3, column y: 'cat' is not a number"),
    ("not_a_class", "x1,y\n" + "0.1,0\n0.2,1.5\n0.3,1\n" * 20,
     ["--expert", "multinomial_logistic", "--num-classes", "2"], "line 3, column y: 1.5 is not a class"),
    ("duplicate_columns", "x1,x1,y\n" + "".join(f"{i},{i},{i % 3}\n" for i in range(40)), [],
     "duplicated column(s) ['x1']; expected each column once"),
    ("fewer_rows_than_parameters", "x1,y\n0.1,1\n0.2,2\n0.3,3\n", ["-k", "5"],
     "3 rows cannot determine the 25 parameters"),
    ("one_row", "x1,y\n0.1,1\n", [], "1 rows cannot determine the 10 parameters"),
    ("header_only", "x1,y\n", [], "no data rows under the header; expected at least one row"),
    ("empty_file", "", [], "empty file; expected a header x1,...,xd,y and data rows"),
    ("ragged", "x1,y\n0.1,1\n0.2,2,3\n" + GOOD_ROWS, [], "line 3 has 3 fields; expected 2, as in the header"),
    ("binary", bytes(range(256)) * 4, [], "not UTF-8 text (byte 0x80 at offset 128); expected a CSV file"),
    ("nul_bytes", b"x1,y\n\x00\x01,2\n", [], "holds NUL bytes, so it is a binary file"),
    ("no_y", "x1,x2\n1,2\n", [], "expected columns x1..xd and y, found ['x1', 'x2']"),
    ("n_init_0", "x1,y\n" + GOOD_ROWS, ["--n-init", "0"], "--n-init: expected a positive integer, got 0"),
    ("negative_tol", "x1,y\n" + GOOD_ROWS, ["--tol", "-1"], "--tol: expected a non-negative number, got -1.0"),
    ("seed_2_63", "x1,y\n" + GOOD_ROWS, ["--seed", str(2**63)], "--seed: expected an integer in [0, 2^63)"),
    ("negative_seed", "x1,y\n" + GOOD_ROWS, ["--seed", "-1"], "--seed: expected an integer in [0, 2^63)"),
    ("gate_invalid_json", "x1,y\n" + GOOD_ROWS, ["--gate", "{name: softmax"], "--gate: invalid JSON"),
    ("gate_json_list", "x1,y\n" + GOOD_ROWS, ["--gate", "[1, 2]"], "--gate: expected a name or a JSON object"),
    ("out_folder_missing", "x1,y\n" + GOOD_ROWS, ["--out", "{tmp}/missing/fit.json"],
     "--out {tmp}/missing/fit.json: no such folder {tmp}/missing; create it first"),
    ("out_is_a_folder", "x1,y\n" + GOOD_ROWS, ["--out", "{tmp}"], "--out {tmp}: is a folder; expected a file path"),
]


@pytest.mark.parametrize("name, content, options, expected", FIT_REFUSALS, ids=[case[0] for case in FIT_REFUSALS])
def test_fit_refuses_bad_data_and_options_before_fitting(tmp_path, name, content, options, expected):
    data = tmp_path / "data.csv"
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    options = [str(option).replace("{tmp}", str(tmp_path)) for option in options]
    if "-k" not in options:
        options += ["-k", "2"]
    code, out, err = run_cli("fit", "--data", data, "--n-init", "1", "--max-iter", "5", *options)
    assert_refused(code, err, expected.replace("{tmp}", str(tmp_path)), status=1)
    assert out == "" and sorted(p.name for p in tmp_path.iterdir()) == ["data.csv"]


def _strict_json(text):
    """Parse JSON as the standard defines it: NaN and Infinity are not JSON."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


FIT_OUTPUTS = [
    ("finite", "".join(f"{i / 40:.3f},{np.sin(6 * i / 40) + 0.1 * np.cos(7 * i):.4f}\n" for i in range(40)), 0,
     lambda report: report["finite"] and isinstance(report["log_likelihood"], float)),
    ("overflowing", "".join(f"{(i % 7) * 1e200},{(i % 5) * 1e300}\n" for i in range(40)), 1,
     lambda report: not report["finite"] and report["log_likelihood"] is None),
]


@pytest.mark.parametrize("name, rows, status, check", FIT_OUTPUTS, ids=[case[0] for case in FIT_OUTPUTS])
def test_fit_writes_valid_json_with_null_for_non_finite_values(tmp_path, name, rows, status, check):
    data, out = tmp_path / "data.csv", tmp_path / "fit.json"
    data.write_text("x1,y\n" + rows)
    code, printed, err = run_cli("fit", "--data", data, "-k", "2", "--n-init", "1", "--max-iter", "5", "--out", out)
    assert code == status, err
    assert check(_strict_json(out.read_text()))
    assert printed == f"wrote {out}\n"
    assert (err == "") == (status == 0) and "Traceback" not in err
    if status:
        assert err.startswith(PREFIX + "the fit did not reach a finite objective")


# ----------------------------------------------------------------------------------------------
# Folders, run folders and other commands.


def _run_folder(tmp_path, table: bytes | None, config_bytes: bytes | None = None) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / storage.CONFIG_FILE).write_bytes(config_bytes or load_config(SMOKE).to_yaml().encode())
    if table is not None:
        (run_dir / storage.TABLE_FILE).write_bytes(table)
    return run_dir


COMMAND_REFUSALS = [
    ("resume_with_out", lambda tmp: ["run", "--resume", tmp, "--out", tmp / "elsewhere", "--no-compile-cache"],
     "--out cannot be combined with --resume"),
    ("out_under_a_file", lambda tmp: ["run", SMOKE, "--out", tmp / "file.txt" / "results", "--no-compile-cache"],
     "--out {tmp}/file.txt/results: {tmp}/file.txt is not a folder"),
    ("cache_under_a_file", lambda tmp: ["run", SMOKE, "--out", tmp, "--compile-cache", tmp / "file.txt" / "cache"],
     "--compile-cache {tmp}/file.txt/cache: {tmp}/file.txt is not a folder"),
    ("compare_out_under_a_file", lambda tmp: ["compare", tmp, "--out", tmp / "file.txt" / "out"],
     "--out {tmp}/file.txt/out: {tmp}/file.txt is not a folder"),
    ("plot_corrupt_parquet", lambda tmp: ["plot", _run_folder(tmp, b"PAR1 not really parquet")],
     "{tmp}/run: a results table (.parquet) cannot be read, it is damaged or not Parquet"),
    ("report_corrupt_parquet", lambda tmp: ["report", _run_folder(tmp, b"\x00" * 64)],
     "{tmp}/run: a results table (.parquet) cannot be read"),
    ("plot_binary_config", lambda tmp: ["plot", _run_folder(tmp, b"", b"\xff\xfe\x00")],
     "{tmp}/run/config.yaml: not UTF-8 text (byte 0xff at offset 0)"),
    ("report_config_not_a_study", lambda tmp: ["report", _run_folder(tmp, b"", b"- just\n- a list\n")],
     "{tmp}/run/config.yaml: <top level>: expected a mapping of keys to values"),
    ("unknown_config_name", lambda tmp: ["run", "no_such_study", "--out", tmp, "--no-compile-cache"],
     "no_such_study: no such config file"),
]


@pytest.mark.parametrize("name, arguments, expected", COMMAND_REFUSALS, ids=[case[0] for case in COMMAND_REFUSALS])
def test_commands_refuse_unusable_folders_and_files(tmp_path, name, arguments, expected):
    (tmp_path / "file.txt").write_text("a file, not a folder\n")
    code, _, err = run_cli(*arguments(tmp_path))
    assert_refused(code, err, expected.replace("{tmp}", str(tmp_path)))


def test_a_shipped_config_runs_by_the_name_list_prints(tmp_path):
    code, out, _ = run_cli("list")
    assert code == 0 and "quickstart.yaml" in out
    # An invalid override stops the run right after the config is found, before any work.
    for name in ("quickstart", "quickstart.yaml"):
        code, _, err = run_cli("run", name, "--set", "replicates=0", "--out", tmp_path, "--no-compile-cache")
        assert_refused(code, err, f"{CONFIGS / 'quickstart.yaml'} (set by --set replicates): replicates")


def test_version_prints_the_installed_version():
    code, out, _ = run_cli("--version")
    assert code == 0 and out == f"moe-theory {version('moe_theory')}\n"


def _sigterm():
    from moe_theory.sweep import Terminated  # SIGTERM during a sweep arrives as this KeyboardInterrupt

    return Terminated("SIGTERM received")


@pytest.mark.parametrize("interruption, status, line", [
    (KeyboardInterrupt, 130, "moe-theory: interrupted\n"),
    (_sigterm, 143, "moe-theory: terminated\n"),
], ids=["ctrl_c", "sigterm"])
def test_an_interruption_prints_one_line_and_exits_with_its_status(monkeypatch, interruption, status, line):
    def interrupted(args):
        raise interruption()

    monkeypatch.setattr(cli, "_list_command", interrupted)
    code, out, err = run_cli("list")
    assert (code, out, err) == (status, "", line)


def test_an_unexpected_exception_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_list_command", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["list"])


def test_a_closed_stdout_pipe_exits_quietly():
    """``moe-theory list | head``: the reader is gone before the first line is written."""
    process = subprocess.Popen([sys.executable, "-m", "moe_theory", "list"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()
    _, err = process.communicate(timeout=120)
    assert process.returncode == cli.BROKEN_PIPE_STATUS and err == b""


def test_config_errors_remain_config_errors_for_the_library(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BILLION_LAUGHS)
    with pytest.raises(ConfigError, match="YAML alias"):
        load_config(path)
