"""Rendering the report: execute ``report.ipynb`` on a run directory with nbclient, write the
executed notebook, an HTML page (nbconvert, code hidden) and a PDF (WeasyPrint; headless
Chromium when WeasyPrint is not installed)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from study import RunLayout
from study.errors import error_line
from study.files import atomic_output

PROJECT_DIR = Path(__file__).resolve().parent.parent
NOTEBOOK = PROJECT_DIR / "report.ipynb"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
INSTALL_HINT = "pip install weasyprint (the report extra: pip install -e '.[report]')"
RUN_DIR_ENV = "REPORT_RUN_DIR"
#: Seconds nbclient waits for a cell's last outputs after the cell has finished (nbclient's
#: default is 4): room for a loaded 2-core machine; a cell that outlasts it is an error, not a
#: silently missing figure.
IOPUB_TIMEOUT = 60
#: nbclient's own log lines (timeouts, a dead kernel) would add to the one error line.
_QUIET_LOG = logging.getLogger("report.render.nbclient")
_QUIET_LOG.setLevel(logging.CRITICAL + 1)
#: WeasyPrint warns about every CSS property of JupyterLab's stylesheet it does not support.
_PDF_LOGGERS = ("weasyprint", "fontTools")


class ReportError(RuntimeError):
    """The report could not be produced: a notebook cell raised or timed out, the kernel died or
    did not start, or the PDF could not be written. The message is one line."""


_HTML_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block notebook_css -%}
{{ super() }}
<style type="text/css">
  body.jp-Notebook { max-width: 60rem; margin: 0 auto; }
  .jp-OutputArea-output.jp-RenderedHTMLCommon { padding-left: var(--jp-code-padding); }
  .jp-OutputArea-output svg, .jp-OutputArea-output img { max-width: 100%; height: auto; }
  .jp-RenderedHTMLCommon table.report-table { border-collapse: collapse; font-size: 11px; margin: 0.5em 0;
    table-layout: auto; margin-left: 0; }
  table.report-table th, table.report-table td { padding: 0.25em 0.5em; text-align: right; white-space: nowrap; }
  table.report-table th { border-bottom: 1px solid #444; white-space: normal; vertical-align: bottom; }
  table.report-table td:first-child, table.report-table td:nth-child(2),
  table.report-table th:first-child, table.report-table th:nth-child(2) { text-align: left; }
  table.report-table tr:nth-child(even) { background: #f3f3f3; }
  @page { size: A4; margin: 12mm 12mm 14mm 12mm; }
  @media print {
    body.jp-Notebook { max-width: none; padding: 0; }
    .jp-Cell { padding: 0; }
    /* JupyterLab lays each output out as a fixed table of 100 % width plus padding, overflow hidden:
       on paper, plain blocks as wide as the text, so nothing is clipped at the right margin */
    .jp-OutputArea-child, .jp-OutputArea-output { display: block; width: auto; }
    .jp-OutputArea-child, .jp-OutputArea-output, .jp-RenderedHTMLCommon { overflow: visible !important; }
    .jp-OutputArea-output.jp-RenderedHTMLCommon { padding-left: 0; padding-right: 0; }
    /* A4's 186 mm of text width: tables in smaller type (the benchmark table has 12 columns), headers
       wrap at spaces; sentences and code spans wrap too */
    .jp-RenderedHTMLCommon table.report-table { font-size: 7pt; }
    table.report-table th, table.report-table td { padding: 0.2em 0.3em; }
    .jp-RenderedHTMLCommon p, .jp-RenderedHTMLCommon li { overflow-wrap: break-word; }
    .jp-RenderedHTMLCommon code { white-space: pre-wrap; overflow-wrap: anywhere; }
    /* keep each output (a heading with its text, a figure, a table) and each table row whole; keep a
       heading (a markdown cell, report.section's output) with what follows */
    .jp-OutputArea-child, svg, img, tr { break-inside: avoid; }
    .jp-MarkdownCell, h1, h2, h3, .keep-with-next { break-after: avoid; }
  }
</style>
{%- endblock notebook_css -%}
"""


def _kernel_manager():
    """A KernelManager for the "python3" kernel that always runs *this* interpreter
    (``sys.executable -m ipykernel_launcher``), whatever kernelspecs the user has installed."""
    from ipykernel.kernelspec import get_kernel_dict
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    class ThisInterpreter(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            if kernel_name == "python3":
                return KernelSpec(resource_dir="", **get_kernel_dict())
            return super().get_kernel_spec(kernel_name)

    return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=ThisInterpreter(), log=_QUIET_LOG)


def _cell_name(nb, index: int) -> str:
    cell = nb.cells[index]
    first = next((line for line in cell.source.splitlines() if line.strip()), "")
    return f"cell {index} (id {cell.get('id', '?')!r}: {first.strip()[:60]!r})"


def _check_errors(nb, notebook: Path) -> None:
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                raise ReportError(f"{notebook.name} {_cell_name(nb, index)} raised "
                                  f"{output.get('ename')}: {output.get('evalue')}")


def execute_notebook(notebook: Path, run_dir: Path, timeout: int):
    """Execute ``notebook`` with ``REPORT_RUN_DIR=run_dir`` in a python3 kernel of this interpreter,
    working directory = the notebook's folder; each cell may run ``timeout`` seconds and send its
    last outputs up to ``IOPUB_TIMEOUT`` seconds after it finished. Returns ``(executed nb, kernel
    argv[0])``. Raises ReportError (one line) naming the cell that raised, timed out or was running
    when the kernel died, or why the kernel did not start."""
    try:
        import nbformat
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

        km = _kernel_manager()
    except ImportError as err:
        raise ReportError(f"the report needs nbclient, nbformat, nbconvert and ipykernel ({error_line(err)}); "
                          f"install them with: pip install -e '.[report]'") from None
    nb = nbformat.read(notebook, as_version=4)
    kernel_python = km.kernel_spec.argv[0]
    running: dict[str, int] = {}  # the index of the cell being executed, once one is

    def on_cell_start(cell, cell_index):
        running["index"] = cell_index

    client = NotebookClient(nb, km=km, timeout=timeout, startup_timeout=120, allow_errors=False,
                            iopub_timeout=IOPUB_TIMEOUT, raise_on_iopub_timeout=True, shutdown_kernel="immediate",
                            record_timing=False, extra_arguments=["--log-level=ERROR"], log=_QUIET_LOG,
                            on_cell_start=on_cell_start, resources={"metadata": {"path": str(notebook.parent)}})
    env = dict(os.environ, **{RUN_DIR_ENV: str(run_dir)}, MPLBACKEND="module://matplotlib_inline.backend_inline")
    try:
        client.execute(env=env, cleanup_kc=True)  # cleanup_kc: shut the kernel down afterwards
    except CellExecutionError as err:
        _check_errors(nb, notebook)  # names the cell
        raise ReportError(f"{notebook.name}: a cell raised: {str(err).strip().splitlines()[-1]}") from err
    except Exception as err:  # noqa: BLE001  (every other way the execution can end: one line)
        raise ReportError(_execution_failure(err, nb, notebook, running.get("index"), timeout,
                                             kernel_python, (CellTimeoutError, DeadKernelError))) from None
    _check_errors(nb, notebook)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    return nb, kernel_python


def _execution_failure(err: Exception, nb, notebook: Path, index: int | None, timeout: int, kernel_python: str,
                       kinds: tuple) -> str:
    """The one-line message for an execution that ended by ``err`` (not a cell's own exception):
    a cell timeout, an output (iopub) timeout, a dead kernel, or a kernel that did not start
    (``index`` None: no cell had started). ``kinds``: nbclient's (CellTimeoutError, DeadKernelError)."""
    cell_timeout, dead_kernel = kinds
    if index is None:
        return f"the python3 kernel ({kernel_python}) did not start: {error_line(err, typed=True)}"
    cell = f"{notebook.name} {_cell_name(nb, index)}"
    if isinstance(err, cell_timeout) and "IOPub" in str(err):
        return f"{cell} finished, but its outputs did not all arrive within {IOPUB_TIMEOUT} s (iopub_timeout)"
    if isinstance(err, cell_timeout):
        return f"{cell} did not finish within {timeout} s (--timeout)"
    if isinstance(err, dead_kernel):
        return f"the kernel ({kernel_python}) died while running {cell}"
    return f"{cell} could not be executed: {error_line(err, typed=True)}"


def to_html(nb, title: str) -> str:
    """nbconvert HTML (lab template) of the executed notebook: code cells and prompts hidden, no
    scripts fetched from the network, print CSS (A4, no page breaks inside figures/tables)."""
    import jinja2
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True,
                            extra_loaders=[jinja2.DictLoader({"report.html.j2": _HTML_TEMPLATE})])
    exporter.template_file = "report.html.j2"
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title}})
    return body


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary on PATH (chromium, chromium-browser, google-chrome) or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def print_pdf(chromium: str, html: Path, pdf: Path, timeout: int = 180) -> Path:
    """Print the HTML file ``html`` to the file ``pdf`` with headless Chromium (A4: the page's
    ``@page`` rule). Raises ReportError when Chromium fails, times out or writes no PDF."""
    with tempfile.TemporaryDirectory(prefix="report-chromium-") as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", "--no-pdf-header-footer", "--print-to-pdf-no-header",
               f"--user-data-dir={profile}", f"--print-to-pdf={pdf}", html.resolve().as_uri()]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ReportError(f"{chromium} did not print {html.name} within {timeout} s") from None
    if proc.returncode != 0 or not pdf.is_file() or pdf.stat().st_size == 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ReportError(f"{chromium} failed to print {html.name} (exit {proc.returncode}): {tail[0]}")
    return pdf


def weasyprint_pdf(html: Path, pdf: Path) -> Path:
    """Render the HTML file ``html`` to the file ``pdf`` with WeasyPrint (A4 and margins: the
    page's ``@page`` rule; relative links resolved against ``html``'s folder). Its warnings about
    CSS it does not support are silenced. Raises ReportError when WeasyPrint fails."""
    import weasyprint  # optional (the report extra): the PDF's default route

    levels = {name: logging.getLogger(name).level for name in _PDF_LOGGERS}
    try:
        for name in _PDF_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        weasyprint.HTML(filename=str(html), base_url=str(html.parent)).write_pdf(str(pdf))
    except Exception as err:  # noqa: BLE001  (any failure of the renderer: one line)
        raise ReportError(f"WeasyPrint failed to render the report's HTML: {error_line(err, typed=True)} "
                          f"(python -m report RUN_DIR --no-pdf writes the .ipynb and .html without it)") from None
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    return pdf


def pdf_route() -> tuple[str | None, str]:
    """How the PDF will be made: ``("weasyprint", "")`` when WeasyPrint imports (it needs Pango,
    which it loads at import); else ``("chromium", path)`` for a Chromium binary on PATH; else
    ``(None, why)``, one sentence naming what was tried and how to get WeasyPrint."""
    try:
        import weasyprint  # noqa: F401  (optional, the report extra; OSError: Pango missing)

        return "weasyprint", ""
    except (ImportError, OSError) as err:
        missing = error_line(err)
    chromium = find_chromium()
    if chromium:
        return "chromium", chromium
    return None, (f"no PDF: WeasyPrint cannot be imported ({missing}) and Chromium is not on PATH "
                  f"(looked for {', '.join(CHROMIUM_NAMES)}); install it with: {INSTALL_HINT}")


def render_report(run_dir: str | os.PathLike, *, pdf: bool = True, timeout: int = 600,
                  notebook: str | os.PathLike | None = None) -> dict:
    """Execute the report notebook on ``run_dir`` and write it, as HTML, and as PDF, into ``run_dir``.

    The three files replace earlier ones only together, once all are complete (each written to a
    temporary file, then renamed): after an error the earlier report is left as it was.

    Args:
        run_dir: a study's output directory (``config.json``, ``teacher/``, ``students/``, CSVs).
        pdf: also write ``report.pdf``: with WeasyPrint, else (not installed) with headless
            Chromium, else one line on stderr says why there is no PDF (``pdf_route``); the .ipynb
            and .html are written.
        timeout: seconds each notebook cell may run.
        notebook: the notebook to execute (default: ``report.ipynb`` next to this file).

    Returns:
        ``{"notebook": Path, "html": Path, "pdf": Path | None, "kernel_python": str,
        "pdf_engine": "weasyprint" | "chromium" | None, "message": str | None}`` (``message``:
        the no-PDF line, if any).

    Raises:
        ValueError: ``run_dir`` or ``notebook`` does not exist.
        ReportError: a cell raised or timed out, the kernel died or did not start, or the PDF
            renderer failed (the message is one line and names the cell).
    """
    run_dir = Path(run_dir).expanduser().resolve()
    notebook = Path(notebook).resolve() if notebook is not None else NOTEBOOK
    if not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} does not exist; pass the --output-dir of a study run")
    if not notebook.is_file():
        raise ValueError(f"notebook {notebook} does not exist")
    nb, kernel_python = execute_notebook(notebook, run_dir, timeout)
    layout = RunLayout(run_dir)
    engine, where = pdf_route() if pdf else (None, "")
    paths = {"notebook": layout.report("ipynb"), "html": layout.report("html"),
             "pdf": layout.report("pdf") if engine else None, "kernel_python": kernel_python,
             "pdf_engine": engine, "message": where if pdf and engine is None else None}
    _write_outputs(nb, f"Study report: {run_dir.name}", paths, engine, where)
    if paths["message"]:
        print(paths["message"], file=sys.stderr)
    return paths


def _write_outputs(nb, title: str, paths: dict, engine: str | None, chromium: str) -> None:
    """Write ``nb`` to ``paths["notebook"]``, its HTML to ``paths["html"]`` and (``engine`` given)
    its PDF to ``paths["pdf"]``: all into temporary files first, renamed over the old files only
    once every one is complete."""
    import nbformat

    with contextlib.ExitStack() as stack:  # on an error each atomic_output removes its temp file
        tmp_nb = stack.enter_context(atomic_output(paths["notebook"]))
        tmp_html = stack.enter_context(atomic_output(paths["html"], suffix=".html"))
        tmp_nb.write_text(nbformat.writes(nb), encoding="utf-8")
        tmp_html.write_text(to_html(nb, title), encoding="utf-8")
        if engine is not None:
            tmp_pdf = stack.enter_context(atomic_output(paths["pdf"], suffix=".pdf"))
            if engine == "weasyprint":
                weasyprint_pdf(tmp_html, tmp_pdf)
            else:
                print_pdf(chromium, tmp_html, tmp_pdf)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m report RUN_DIR [--no-pdf] [--timeout S]``; exit 0 ok, 2 with one ``error:``
    line on stderr when the report cannot be made (bad input, a cell raised or timed out, the
    kernel died or did not start, the PDF renderer failed)."""
    parser = argparse.ArgumentParser(prog="python -m report", description="Execute report.ipynb on a run directory and render "
                                                 "report.ipynb / report.html / report.pdf into it.")
    parser.add_argument("run_dir", help="a study's --output-dir (e.g. runs/smoke)")
    parser.add_argument("--no-pdf", action="store_true", help="skip the PDF")
    parser.add_argument("--timeout", type=int, default=600, help="seconds each notebook cell may run (default: 600)")
    args = parser.parse_args(argv)
    if args.timeout < 1:
        print(f"error: --timeout {args.timeout}: must be a number of seconds >= 1", file=sys.stderr)
        return 2
    try:
        paths = render_report(args.run_dir, pdf=not args.no_pdf, timeout=args.timeout)
    except (ValueError, ReportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for key in ("notebook", "html", "pdf"):
        if paths[key] is not None:
            print(f"{key}: {paths[key]}")
    return 0
