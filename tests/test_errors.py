import re
from pathlib import Path

import pytest

from imagegen.util.errors import ERRORS, ImagegenError

REPO = Path(__file__).resolve().parent.parent


def test_every_code_is_documented_with_its_exit_code():
    documented = dict(re.findall(r"^\| `([a-z_]+)` \| (\d+) \|", (REPO / "docs" / "errors.md").read_text(), re.M))
    assert documented == {code: str(kind.exit_code) for code, kind in ERRORS.items()}


def test_every_code_raised_in_the_package_is_registered():
    raised = set()
    for path in (REPO / "imagegen").rglob("*.py"):
        raised |= set(re.findall(r'ImagegenError\(\s*"([a-z_]+)"', path.read_text()))
        raised |= set(re.findall(r'code="([a-z_]+)"', path.read_text()))
    assert raised and raised <= set(ERRORS), raised - set(ERRORS)


def test_unregistered_codes_are_refused_and_json_is_complete():
    with pytest.raises(KeyError):
        ImagegenError("no_such_code", "x")
    record = ImagegenError("invalid_size", "bad").to_json()
    assert record == {"schema": "imagegen.error/1", "code": "invalid_size", "message": "bad",
                      "hint": ERRORS["invalid_size"].hint, "exit_code": 2}

