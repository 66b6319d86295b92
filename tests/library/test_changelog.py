"""The version follows CHANGELOG.md: its newest section is the package's version."""

import re
from pathlib import Path

import kerasbn

ROOT = Path(__file__).resolve().parents[2]


def test_the_newest_changelog_section_is_the_package_version():
    sections = re.findall(r"^## (\d+\.\d+\.\d+)\b", (ROOT / "CHANGELOG.md").read_text(), re.MULTILINE)
    assert sections, "CHANGELOG.md has no '## X.Y.Z' section"
    assert sections[0] == kerasbn.__version__
    versions = [tuple(map(int, v.split("."))) for v in sections]
    assert versions == sorted(versions, reverse=True) and len(set(versions)) == len(versions)
