"""What the benchmark scripts share: the results files they refresh section by section."""
import os


def write_section(path: str, name: str, text: str, header: str) -> None:
    """Replace section ``name`` of ``path`` (between its ``<!-- name: begin/end -->`` markers) by
    ``text``, or append it; a new file starts with ``header``. Everything outside the section
    (the readings written by hand) is kept."""
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    old = open(path).read() if os.path.exists(path) else header
    section = f"{begin}\n{text.rstrip(chr(10))}\n{end}\n"
    if begin in old and end in old:
        new = old[:old.index(begin)] + section + old[old.index(end) + len(end) + 1:]
    else:
        new = old.rstrip("\n") + "\n\n" + section
    with open(path, "w") as f:
        f.write(new)
