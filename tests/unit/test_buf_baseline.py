"""buf breaking compares the contracts with the committed release baseline, so a
break is caught in a fresh clone and on main too, not only on a branch."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "protos"))
import buf_checks  # noqa: E402

USER_PROTO = "aimesh/user/v1/user_service.proto"
PASSWORD_FIELD = """  // Password.
  string password = 2 [(buf.validate.field).string = {
    min_len: 1
    max_len: 1024
  }];
}"""


def _copy_with(tmp_path: Path, old: str, new: str) -> Path:
    """A copy of the contracts with one edit in user_service.proto, as an image."""
    root = tmp_path / "protos"
    shutil.copytree(
        ROOT / "protos" / "aimesh", root / "aimesh", ignore=shutil.ignore_patterns("*.py*")
    )
    proto = root / USER_PROTO
    text = proto.read_text()
    assert text.count(old) == 1, f"{old!r} is not in {USER_PROTO} exactly once"
    proto.write_text(text.replace(old, new))
    image = tmp_path / "image.binpb"
    buf_checks.build_image(image, root)
    return image


BREAKS: dict[str, tuple[str, str, str]] = {
    "removed field": (PASSWORD_FIELD, "}", 'field "2" with name "password"'),
    "renumbered field": (
        PASSWORD_FIELD,
        PASSWORD_FIELD.replace("password = 2", "password = 3"),
        'field "2" with name "password"',
    ),
    "renamed method": (
        "rpc Login(LoginRequest)",
        "rpc SignIn(LoginRequest)",
        'RPC "Login" on service "UserService" was deleted',
    ),
}


@pytest.mark.parametrize("change", list(BREAKS))
def test_a_break_of_the_released_contract_fails(tmp_path: Path, change: str) -> None:
    old, new, named = BREAKS[change]
    problems = buf_checks.breaking(_copy_with(tmp_path, old, new))
    assert named in problems, problems


def test_an_added_field_is_compatible(tmp_path: Path) -> None:
    added = PASSWORD_FIELD.removesuffix("}") + "  // Added later.\n  string hint = 99;\n}"
    assert buf_checks.breaking(_copy_with(tmp_path, PASSWORD_FIELD, added)) == ""


def test_the_working_tree_matches_the_baseline_or_extends_it(tmp_path: Path) -> None:
    image = tmp_path / "current.binpb"
    buf_checks.build_image(image)
    assert buf_checks.breaking(image) == ""


def test_a_missing_baseline_is_an_error_not_a_pass(tmp_path: Path) -> None:
    image = tmp_path / "current.binpb"
    buf_checks.build_image(image)
    assert "no baseline" in buf_checks.breaking(image, against=tmp_path / "absent.binpb")
