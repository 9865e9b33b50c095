"""nbval compares every output it can: a cell is left `nbval-ignore-output` only with its reason on its
first line, and their number cannot grow unnoticed (raise IGNORED_AT_MOST here, with the reason, if a
new cell truly cannot be stable)."""
from pathlib import Path

import nbformat

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
IGNORED_AT_MOST = 17  # plotly figures (their JSON is not stable text), the calibration records (they grow)


def _ignored():
    for nb in NOTEBOOKS:
        for cell in nbformat.read(nb, as_version=4).cells:
            if "nbval-ignore-output" in cell.metadata.get("tags", []):
                yield nb.name, cell.source


def test_every_ignored_cell_says_why_and_their_number_does_not_grow():
    cells = list(_ignored())
    assert NOTEBOOKS and len(cells) <= IGNORED_AT_MOST, f"{len(cells)} nbval-ignored cells (at most {IGNORED_AT_MOST})"
    for name, src in cells:
        first = src.splitlines()[0]
        assert first.startswith("# nbval-ignore-output: ") and len(first) > 40, f"{name}: no reason given: {first!r}"
    # the numbers a reader checks are compared: no cell that prints a verdict or a table is ignored
    assert not [n for n, s in cells if "describe(" in s or "final_table" in s or "components" in s], \
        "a cell printing verdicts or tables is nbval-ignored"


def test_the_notebooks_are_what_make_notebooks_writes():
    # make_notebooks.py keeps the common cells identical; a cell edited in one notebook and not in the
    # script would be undone the next time the script runs
    import runpy
    script = runpy.run_path(str(NOTEBOOKS[0].parent / "make_notebooks.py"), run_name="make_notebooks")
    for name, cells in script["NB"].items():
        committed = nbformat.read(NOTEBOOKS[0].parent / f"{name}.ipynb", as_version=4).cells
        assert [c.source for c in committed] == [c.source for c in cells], f"{name}.ipynb differs from make_notebooks.py"
        assert [c.metadata.get("tags", []) for c in committed] == [c.metadata.get("tags", []) for c in cells], name


def test_the_stored_verdicts_of_other_profiles_are_the_committed_ones():
    # notebook 05 prints every other profile's committed verdicts, and nbval compares that output: when a
    # profile's verdicts change (the decisive protocol's, as its runs come in), the stored output must be
    # refreshed with them, or CI's nbval fails. This says so here, in seconds, with the lines to store.
    import contextlib
    import io
    import json

    from pixelrepa import study
    nb = nbformat.read(NOTEBOOKS[0].parent / "05_final_fid.ipynb", as_version=4)
    [cell] = [c for c in nb.cells if c.cell_type == "code" and "verdicts.json" in c.source and "prof != P.profile" in c.source]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(cell.source, {"study": study, "json": json, "P": study.load_profile("smoke")})
    stored = "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")
    assert stored == printed.getvalue(), \
        f"notebooks/05_final_fid.ipynb stores other profiles' verdicts that are no longer committed; store:\n{printed.getvalue()}"
