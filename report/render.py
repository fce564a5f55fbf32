"""Rendering the report: execute ``report.ipynb`` on a run directory with nbclient, write the
executed notebook, an HTML page (nbconvert, code hidden) and a PDF (headless Chromium)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from study import RunLayout
from study.files import atomic_output, atomic_write_text

PROJECT_DIR = Path(__file__).resolve().parent.parent
NOTEBOOK = PROJECT_DIR / "report.ipynb"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
INSTALL_HINT = "apt-get install -y chromium"
RUN_DIR_ENV = "REPORT_RUN_DIR"


class ReportError(RuntimeError):
    """The report could not be produced: a notebook cell raised, or Chromium failed."""


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
    .jp-OutputArea-output, .jp-RenderedHTMLCommon { overflow: visible !important; }
    /* keep a section's heading, text and figure together; keep a heading cell with what follows */
    .jp-Cell-outputWrapper, .jp-OutputArea-child, svg, img, table, tr { break-inside: avoid; }
    .jp-MarkdownCell, h1, h2, h3 { break-after: avoid; }
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

    return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=ThisInterpreter())


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
    working directory = the notebook's folder. Returns ``(executed nb, kernel argv[0])``.
    Raises ReportError naming the first cell that raised."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(notebook, as_version=4)
    km = _kernel_manager()
    kernel_python = km.kernel_spec.argv[0]
    client = NotebookClient(nb, km=km, timeout=timeout, startup_timeout=120, allow_errors=False,
                            record_timing=False, extra_arguments=["--log-level=ERROR"],
                            resources={"metadata": {"path": str(notebook.parent)}})
    env = dict(os.environ, **{RUN_DIR_ENV: str(run_dir)}, MPLBACKEND="module://matplotlib_inline.backend_inline")
    try:
        client.execute(env=env, cleanup_kc=True)  # cleanup_kc: shut the kernel down afterwards
    except CellExecutionError as err:
        _check_errors(nb, notebook)  # names the cell
        raise ReportError(f"{notebook.name}: a cell raised: {str(err).strip().splitlines()[-1]}") from err
    _check_errors(nb, notebook)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    return nb, kernel_python


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
    """Print ``html`` to ``pdf`` with headless Chromium (atomic: temp file, then os.replace).
    Raises ReportError when Chromium fails or writes no PDF."""
    with atomic_output(pdf) as tmp, tempfile.TemporaryDirectory(prefix="report-chromium-") as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", "--no-pdf-header-footer", "--print-to-pdf-no-header",
               f"--user-data-dir={profile}", f"--print-to-pdf={tmp}", html.resolve().as_uri()]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ReportError(f"{chromium} did not print {html.name} within {timeout} s") from None
        if proc.returncode != 0 or os.path.getsize(tmp) == 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ReportError(f"{chromium} failed to print {html.name} (exit {proc.returncode}): {tail[0]}")
    return pdf


def render_report(run_dir: str | os.PathLike, *, pdf: bool = True, timeout: int = 600,
                  notebook: str | os.PathLike | None = None) -> dict:
    """Execute the report notebook on ``run_dir`` and write it, as HTML, and as PDF, into ``run_dir``.

    Args:
        run_dir: a study's output directory (``config.json``, ``teacher/``, ``students/``, CSVs).
        pdf: also print ``report.pdf`` with headless Chromium. Without a Chromium binary, one line on
            stderr says why there is no PDF and how to install it; the .ipynb and .html are written.
        timeout: seconds each notebook cell may run.
        notebook: the notebook to execute (default: ``report.ipynb`` next to this file).

    Returns:
        ``{"notebook": Path, "html": Path, "pdf": Path | None, "kernel_python": str,
        "message": str | None}`` (``message``: the no-PDF line, if any).

    Raises:
        ValueError: ``run_dir`` or ``notebook`` does not exist.
        ReportError: a cell raised (the message names the cell), or Chromium failed.
    """
    run_dir = Path(run_dir).expanduser().resolve()
    notebook = Path(notebook).resolve() if notebook is not None else NOTEBOOK
    if not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} does not exist; pass the --output-dir of a study run")
    if not notebook.is_file():
        raise ValueError(f"notebook {notebook} does not exist")
    import nbformat

    nb, kernel_python = execute_notebook(notebook, run_dir, timeout)
    layout = RunLayout(run_dir)
    paths = {"notebook": layout.report("ipynb"), "html": layout.report("html"), "pdf": None,
             "kernel_python": kernel_python, "message": None}
    atomic_write_text(paths["notebook"], nbformat.writes(nb))
    atomic_write_text(paths["html"], to_html(nb, f"Study report: {run_dir.name}"))
    if pdf:
        chromium = find_chromium()
        if chromium is None:
            paths["message"] = (f"no PDF: Chromium not found (looked for {', '.join(CHROMIUM_NAMES)}); "
                                f"install it with: {INSTALL_HINT}")
            print(paths["message"], file=sys.stderr)
        else:
            paths["pdf"] = print_pdf(chromium, paths["html"], layout.report("pdf"))
    return paths


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m report RUN_DIR [--no-pdf] [--timeout S]``; exit 0 ok, 2 on a report error."""
    parser = argparse.ArgumentParser(prog="python -m report", description="Execute report.ipynb on a run directory and render "
                                                 "report.ipynb / report.html / report.pdf into it.")
    parser.add_argument("run_dir", help="a study's --output-dir (e.g. runs/smoke)")
    parser.add_argument("--no-pdf", action="store_true", help="skip the PDF (no Chromium needed)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per notebook cell (default: 600)")
    args = parser.parse_args(argv)
    try:
        paths = render_report(args.run_dir, pdf=not args.no_pdf, timeout=args.timeout)
    except (ValueError, ReportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for key in ("notebook", "html", "pdf"):
        if paths[key] is not None:
            print(f"{key}: {paths[key]}")
    return 0
