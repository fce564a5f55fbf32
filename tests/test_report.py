"""Tests for the report package / report.ipynb: the executed report of a real smoke run, and rendering paths."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

import nbformat

import report
import report.render

REPO_ROOT = Path(__file__).resolve().parents[1]

ACCURACY_COLUMNS = {"test_acc": "test acc (stop)", "best_test_acc": "best test acc",
                    "onnx_test_acc": "ONNX test acc (DeepSparse)"}


def _outputs(nb):
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            yield cell, output


def _pipe_table(markdown: str) -> dict[str, dict[str, str]]:
    """The first pipe table in ``markdown`` as {first column value: {header: cell}}."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    header, rows = split[0], [row for row in split[2:]]  # split[1] is the |---| rule
    return {row[0]: dict(zip(header, row)) for row in rows}


def _tiny_notebook(path, *sources: str):
    """A notebook at ``path``: a markdown cell (index 0), then one code cell per source (ids
    ``the-cell``, ``cell-2``, ...)."""
    ids = ["the-cell", *(f"cell-{i}" for i in range(2, len(sources) + 1))]
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# tiny", id="title"),
        *(nbformat.v4.new_code_cell(source, id=i) for i, source in zip(ids, sources)),
    ])
    nbformat.write(nb, path)
    return path


def _pdf_text(pdf) -> str:
    """The text of every page of ``pdf`` (pypdf), each run of whitespace squeezed into one space."""
    import re

    from pypdf import PdfReader

    return re.sub(r"\s+", " ", " ".join(page.extract_text() for page in PdfReader(pdf).pages))


def _glyph_widths(font) -> tuple[dict, float]:
    """A composite (Type0) PDF font's glyph widths: ({CID: width in 1/1000 em}, default width)."""
    descendant = font["/DescendantFonts"][0].get_object()
    widths, w = {}, list(descendant.get("/W", []))
    while w:
        first, rest = int(w[0]), w[1]
        if isinstance(rest, list):
            widths.update({first + i: float(v) for i, v in enumerate(rest)})
            w = w[2:]
        else:  # first last width
            widths.update({cid: float(w[2]) for cid in range(first, int(rest) + 1)})
            w = w[3:]
    return widths, float(descendant.get("/DW", 1000))


def _past_right_edge(pdf, margin_pt: float = 34.0) -> list:
    """Text runs of ``pdf`` that end right of the text area, the page width less ``margin_pt``
    (the report's 12 mm right margin), by more than 1 pt: a table or line cut off at the right
    edge (text that WeasyPrint clips is still drawn, under a clip path). Each run's end is its
    ``Tm`` position plus its ``TJ`` glyphs' widths (the font's ``/W`` array; 2-byte CIDs, as
    WeasyPrint writes them). Returns [(page number, start x, end x in pt)]."""
    from pypdf import PdfReader

    cut = []
    for number, page in enumerate(PdfReader(pdf).pages, 1):
        fonts, limit, state = page["/Resources"].get("/Font", {}), float(page.mediabox.width) - margin_pt + 1, {}

        def visit(operator, args, cm, tm, number=number, fonts=fonts, limit=limit, state=state):
            if operator == b"Tf":
                state["widths"], state["size"] = _glyph_widths(fonts[args[0]].get_object()), float(args[1])
            elif operator == b"Tm":
                state["x"], state["scale"] = float(args[4]) * cm[0] + cm[4], float(args[0]) * cm[0]
            elif operator == b"TJ" and "widths" in state:
                (widths, default), em = state["widths"], 0.0
                for item in args[0]:
                    if isinstance(item, bytes):
                        em += sum(widths.get(int.from_bytes(item[i:i + 2], "big"), default) for i in range(0, len(item), 2))
                    else:
                        em -= float(item)
                start, state["x"] = state["x"], state["x"] + em / 1000 * state["size"] * state["scale"]
                if state["x"] > limit:
                    cut.append((number, round(start), round(state["x"])))

        page.extract_text(visitor_operand_before=visit)
    return cut


def _hide_chromium(monkeypatch):
    monkeypatch.setattr(report.render.shutil, "which", lambda name: None)


def test_notebook_has_parameters_cell():
    nb = nbformat.read(report.render.NOTEBOOK, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1 and "REPORT_RUN_DIR" in cells[0].source and "runs/smoke" in cells[0].source


def test_report_of_smoke_run(smoke_run, monkeypatch):
    """The executed report of the real smoke run has no errors and an "Accuracy" table whose
    accuracies equal results.csv to 4 decimals, for every model of the study. Its PDF, made with
    no Chromium on PATH, holds every model of that table and the benchmark's verdict sentences,
    and no text starts past a page's right edge (no table cut off)."""
    import pandas as pd

    _hide_chromium(monkeypatch)
    paths = report.render_report(smoke_run, pdf=True)
    assert paths["notebook"] == smoke_run / "report.ipynb" and paths["notebook"].is_file()
    assert paths["html"].is_file() and paths["html"].stat().st_size > 10_000
    assert paths["pdf"] == smoke_run / "report.pdf" and paths["pdf_engine"] == "weasyprint"

    nb = nbformat.read(paths["notebook"], as_version=4)
    errors = [f"{cell.get('id')}: {out.get('ename')}: {out.get('evalue')}" for cell, out in _outputs(nb)
              if out.get("output_type") == "error"]
    assert not errors, errors

    tables = [out["data"]["text/markdown"] for _, out in _outputs(nb)
              if "text/markdown" in out.get("data", {}) and out["data"]["text/markdown"].startswith("## Accuracy")]
    assert len(tables) == 1, "no output headed 'Accuracy' with the accuracy table"
    table = _pipe_table(tables[0])

    results = pd.read_csv(smoke_run / "results.csv")
    for model in report.MODELS:
        assert model in table, f"no row for {model} in the accuracy table: {sorted(table)}"
        expected = results[results["model"] == model].iloc[-1]
        for column, header in ACCURACY_COLUMNS.items():
            value = expected.get(column)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            assert table[model][header] == f"{float(value):.4f}", (model, column, table[model])

    text = _pdf_text(paths["pdf"])
    rows = [" ".join(cell for cell in row.values() if cell) for row in table.values()]  # "ce CE 9.99 4 0.2100 ..."
    missing = [row for row in rows if f" {row} " not in text]
    assert not missing, (missing, text[text.find("Accuracy"):][:1500])
    bench = pd.read_csv(smoke_run / "benchmark.csv")
    verdicts = [s for batch in sorted(bench["batch_size"].unique()) for s in report.compression_verdict(bench, int(batch))]
    assert verdicts and all(" ".join(s.split()) in text for s in verdicts), (verdicts, text[-3000:])
    assert _past_right_edge(paths["pdf"]) == []


def test_pdf_without_chromium(tmp_path, monkeypatch):
    """No Chromium on the machine: WeasyPrint (a pip package) writes report.pdf, A4, with the
    notebook's output in it; no temporary file is left."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    notebook = _tiny_notebook(tmp_path / "tiny.ipynb",
                              "import os, sys\nprint(os.environ['REPORT_RUN_DIR'])\nprint(sys.executable)")
    _hide_chromium(monkeypatch)

    paths = report.render_report(run_dir, pdf=True, notebook=notebook, timeout=60)

    assert paths["pdf"] == run_dir / "report.pdf" and paths["pdf_engine"] == "weasyprint" and paths["message"] is None
    from pypdf import PdfReader

    box = PdfReader(paths["pdf"]).pages[0].mediabox
    assert (round(float(box.width)), round(float(box.height))) == (595, 842)  # A4 in pt
    assert str(run_dir.resolve()) in _pdf_text(paths["pdf"]).replace(" ", "")
    printed = nbformat.read(paths["notebook"], as_version=4).cells[1].outputs[0]["text"].split()
    assert printed == [str(run_dir.resolve()), sys.executable]  # REPORT_RUN_DIR set; same interpreter
    assert sorted(p.name for p in run_dir.iterdir()) == ["report.html", "report.ipynb", "report.pdf"]


def test_no_pdf_engine_writes_html_and_says_why(tmp_path, monkeypatch, capsys):
    """Neither WeasyPrint nor Chromium: the .ipynb and .html are written, and one stderr line
    says why there is no PDF and how to install WeasyPrint."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    notebook = _tiny_notebook(tmp_path / "tiny.ipynb", "print('hello')")
    _hide_chromium(monkeypatch)
    monkeypatch.setitem(sys.modules, "weasyprint", None)  # import weasyprint raises ImportError

    paths = report.render_report(run_dir, pdf=True, notebook=notebook, timeout=60)

    assert paths["pdf"] is None and paths["pdf_engine"] is None and not (run_dir / "report.pdf").exists()
    assert paths["html"] == run_dir / "report.html" and paths["html"].is_file()
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1 and stderr[0] == paths["message"]
    assert "WeasyPrint cannot be imported" in stderr[0] and "Chromium is not on PATH" in stderr[0]
    assert "pip install weasyprint" in stderr[0]
    assert sorted(p.name for p in run_dir.iterdir()) == ["report.html", "report.ipynb"]


def _earlier_report(run_dir):
    """A finished earlier report in ``run_dir``: {path: bytes}."""
    files = {run_dir / f"report.{ext}": f"earlier good report.{ext}".encode() for ext in ("ipynb", "html", "pdf")}
    for path, data in files.items():
        path.write_bytes(data)
    return files


@pytest.mark.parametrize("source, timeout, expected", [
    ("import time\ntime.sleep(120)", 3,
     r"^error: tiny\.ipynb cell 2 \(id 'cell-2': 'import time'\) did not finish within 3 s \(--timeout\)$"),
    ("import os\nos._exit(1)", 60,
     r"^error: the kernel \(.*python.*\) died while running tiny\.ipynb cell 2 \(id 'cell-2': 'import os'\)$"),
], ids=["cell-timeout", "dead-kernel"])
def test_cli_execution_failure_is_one_line(tmp_path, monkeypatch, capsys, source, timeout, expected):
    """A cell that outlives --timeout, or a kernel that dies in a cell: exit 2, one ``error:``
    line naming the cell, and the earlier report left as it was (no temporary files)."""
    import re

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    earlier = _earlier_report(run_dir)
    monkeypatch.setattr(report.render, "NOTEBOOK", _tiny_notebook(tmp_path / "tiny.ipynb", "print('ok')", source))

    assert report.main([str(run_dir), "--timeout", str(timeout)]) == 2

    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and re.match(expected, err[0]), err
    assert captured.out == ""
    assert {path: path.read_bytes() for path in run_dir.iterdir()} == earlier


def test_pdf_failure_keeps_the_earlier_report(tmp_path, monkeypatch, capsys):
    """WeasyPrint fails after the notebook ran: exit 2, one ``error:`` line, and none of the
    three earlier files replaced (the new .ipynb and .html are not left next to the old PDF)."""
    import weasyprint

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    earlier = _earlier_report(run_dir)
    monkeypatch.setattr(report.render, "NOTEBOOK", _tiny_notebook(tmp_path / "tiny.ipynb", "print('ok')"))
    _hide_chromium(monkeypatch)

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(weasyprint, "HTML", broken)

    assert report.main([str(run_dir)]) == 2

    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: WeasyPrint failed to render the report's HTML: "
                                               "RuntimeError: no fonts"), err
    assert {path: path.read_bytes() for path in run_dir.iterdir()} == earlier


def test_kernel_that_does_not_start_is_one_line(tmp_path, monkeypatch, capsys):
    """The kernel's Python is missing: exit 2 and one ``error:`` line naming it."""
    import ipykernel.kernelspec

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    earlier = _earlier_report(run_dir)
    monkeypatch.setattr(report.render, "NOTEBOOK", _tiny_notebook(tmp_path / "tiny.ipynb", "print('ok')"))
    kernel_dict = ipykernel.kernelspec.get_kernel_dict

    def missing_python(*args, **kwargs):
        spec = kernel_dict(*args, **kwargs)
        return {**spec, "argv": [str(tmp_path / "no-such-python"), *spec["argv"][1:]]}

    monkeypatch.setattr(ipykernel.kernelspec, "get_kernel_dict", missing_python)

    assert report.main([str(run_dir)]) == 2

    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: the python3 kernel ({tmp_path / 'no-such-python'}) "
                                               "did not start: FileNotFoundError"), err
    assert {path: path.read_bytes() for path in run_dir.iterdir()} == earlier


def test_cell_error_names_the_cell(tmp_path):
    notebook = _tiny_notebook(tmp_path / "bad.ipynb", "raise ValueError('boom')")
    with pytest.raises(report.ReportError, match=r"cell 1 \(id 'the-cell'.*ValueError: boom"):
        report.render_report(tmp_path, pdf=False, notebook=notebook, timeout=60)
    assert not (tmp_path / "report.html").exists()


def test_cli_rejects_missing_run_dir(tmp_path, capsys):
    assert report.main([str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def _seeds_run(tmp_path):
    """A RunData of a 2-seed run with a validation split, built from given numbers."""
    import pandas as pd

    from report.data import RunData

    results = pd.DataFrame([
        {"model": "teacher", "seed": 0, "test_acc": 0.30, "best_test_acc": 0.32, "best_val_acc": 0.31, "params": 11e6},
        {"model": "ce", "seed": 0, "test_acc": 0.20, "best_test_acc": 0.21, "best_val_acc": 0.20, "params": 9e6},
        {"model": "ce", "seed": 1, "test_acc": 0.22, "best_test_acc": 0.23, "best_val_acc": 0.22, "params": 9e6},
        {"model": "kd", "seed": 0, "test_acc": 0.25, "best_test_acc": 0.26, "best_val_acc": 0.27, "params": 9e6},
        {"model": "kd", "seed": 1, "test_acc": 0.27, "best_test_acc": 0.28, "best_val_acc": 0.30, "params": 9e6,
         "onnx_test_acc": 0.275},
        {"model": "pruned", "seed": 1, "test_acc": 0.20, "weight_sparsity": 0.8, "base": "kd", "params": 9e6,
         "onnx_test_acc": 0.195},
        {"model": "pruned_quantized", "seed": 1, "test_acc": 0.18, "weight_sparsity": 0.8, "base": "kd",
         "params": 9e6, "onnx_test_acc": 0.18},
        {"model": "pruned_quantized_qdq", "seed": 1, "test_acc": 0.18, "weight_sparsity": 0.8, "base": "kd",
         "params": 9e6, "onnx_test_acc": 0.185},
    ])
    setups = pd.DataFrame([
        {"setup": "ce", "seeds": 2, "test_acc_mean": 0.22, "test_acc_std": 0.0141421, "ci95_low": 0.04,
         "ci95_high": 0.40, "val_acc_mean": 0.21, "welch_p_vs_winner": 0.0572},
        {"setup": "kd", "seeds": 2, "test_acc_mean": 0.27, "test_acc_std": 0.0141421, "ci95_low": 0.09,
         "ci95_high": 0.45, "val_acc_mean": 0.285, "welch_p_vs_winner": float("nan")},
    ])
    import dataclasses

    from study import make_config

    config = dataclasses.asdict(make_config("smoke", seeds=2, val_size=100))
    return RunData(run_dir=tmp_path, config=config, results=results,
                   setups=setups, sparsify_summary={"setup": "kd", "loss": "kd", "test_acc_dense": 0.28})


def test_setups_and_sparse_tables_of_a_seeds_run(tmp_path):
    run = _seeds_run(tmp_path)
    assert run.metric == "val_acc" and run.seeds == 2 and report.base_seed(run) == 1
    setups = report.setups_table(run)
    assert list(setups.columns) == ["setup", "seeds", "test acc mean (%)", "95 % CI (%)", "val acc mean (%)",
                                    "Welch p vs winner"]
    assert setups.iloc[0].tolist() == ["ce", "2", "22.0 ± 1.4", "4.0 – 40.0", "21.0", "0.0572"]
    assert setups.iloc[1].tolist() == ["kd", "2", "27.0 ± 1.4", "9.0 – 45.0", "28.5", ""]
    sparse = report.sparse_table(run)
    assert list(sparse.columns) == ["model", "from", "test acc (%)", "vs dense (pp)", "ONNX test acc (%)",
                                    "weight sparsity (%)"]
    assert sparse.values.tolist() == [["dense kd s1 (best epoch)", "", "28.0", "", "27.5", ""],
                                      ["pruned", "kd s1", "20.0", "-8.0", "19.5", "80.0"],
                                      ["pruned_quantized", "kd s1", "18.0", "-10.0", "18.0", "80.0"],
                                      ["pruned_quantized_qdq", "kd s1", "18.0", "-10.0", "18.5", "80.0"]]
    table = report.accuracy_table(run)
    assert list(table["seed"]) == ["0", "0", "1", "0", "1", "1", "1", "1"]
    assert table["model"].iloc[-1] == "pruned_quantized_qdq"
    assert "val acc (best epoch)" in table and "only reported" in report.accuracy_note(table, run)
    lines = report.findings(run)
    assert lines[0].startswith("Winner by mean validation accuracy over 2 seeds: kd (test accuracy 27.0 %, "
                               "95 % CI 9.0-45.0 %); ahead of ce by 5.0 percentage points of test accuracy; "
                               "Welch's t-test p = 0.0572: not significant at the 0.05 level.")
    assert "Sparsifying the kd student (seed 1, its best seed) (28.0 % dense, PyTorch, fine-tuned with the kd " \
           "loss (labels and the frozen teacher's soft targets)): pruning" in lines[1]
    assert lines[1].endswith("Exported to ONNX and run in DeepSparse: dense kd 27.5 %, pruned 19.5 %, "
                             "pruned_quantized 18.0 %, pruned_quantized_qdq 18.5 %.")
    summary = report.run_summary(run)
    assert "300 training (100 of them held out for validation) / 200 test images" in summary
    assert "stop when validation accuracy changes" in summary and "2 seeds per setup (0..1)" in summary
    assert "**Decision rule: val_acc on 100 training images held out of training (stratified)" in summary


def test_the_onnx_accuracy_names_the_engine_that_measured_it(tmp_path):
    """On the Python 3.12 profile onnx_accuracy.json is onnxruntime's (its DeepSparse rows, through
    --deepsparse-python, carry no accuracy): the accuracy table, its note and the findings say so."""
    import dataclasses

    import pandas as pd

    run = _seeds_run(tmp_path)
    assert run.onnx_accuracy_engine == "DeepSparse"  # no benchmark.csv: as before the column existed
    common = {"batch_size": 1, "num_cores": 2, "items_per_sec": 100.0, "latency_mean_ms": 10.0, "latency_p50_ms": 10.0,
              "latency_p99_ms": 12.0, "isa": "avx512", "vnni": True, "status": "ok", "error": ""}
    rows = [{**common, "model": "pruned", "engine": "onnxruntime", "accuracy": 0.195},
            {**common, "model": "pruned", "engine": "deepsparse", "accuracy": 0.19}]
    assert dataclasses.replace(run, benchmark=pd.DataFrame(rows)).onnx_accuracy_engine == "DeepSparse"
    rows[1]["accuracy"] = None  # timed by the deepsparse.benchmark command only
    run = dataclasses.replace(run, benchmark=pd.DataFrame(rows))
    assert run.onnx_accuracy_engine == "onnxruntime"
    table = report.accuracy_table(run)
    assert "ONNX test acc (onnxruntime)" in table and "ONNX test acc (DeepSparse)" not in table
    assert "of the exported ONNX model run in onnxruntime." in report.accuracy_note(table, run)
    assert "Exported to ONNX and run in onnxruntime: dense kd 27.5 %" in report.findings(run)[1]
