"""A config without [[intercept]] (the package's shipped file) is said to capture nothing."""

from __future__ import annotations

from tproxyd.reconciler.cli import main


def test_check_says_nothing_to_intercept_without_an_intercept(tmp_path, capsys):
    path = tmp_path / "t.toml"
    path.write_text("[relay]\nport = 12345\n")
    assert main(["check", "--config-only", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "nothing to intercept" in out and "nft table" not in out.replace("no rule, route, nft table", "")
