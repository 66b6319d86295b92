"""Reading the Markdown tables the recipes write."""


def table_row(table: str, name: str, section: int = 0) -> list[str]:
    """The cells of ``table``'s row whose first cell is ``name`` (in the ``section``-th table holding
    one, counted from 0); AssertionError if none."""
    rows = [cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table.splitlines())
            if cells[0] == name]
    if len(rows) <= section:
        raise AssertionError(f"{name} not in table {section} of\n{table}")
    return rows[section]
