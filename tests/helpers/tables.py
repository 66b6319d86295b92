"""Reading the Markdown tables the recipes write."""


def table_row(table: str, name: str) -> list[str]:
    """The cells of ``table``'s row whose first cell is ``name``; AssertionError if none."""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == name:
            return cells
    raise AssertionError(f"{name} not in\n{table}")
