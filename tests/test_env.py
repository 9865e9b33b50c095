"""The three descriptions of the environment agree: pyproject.toml, environment.yml, requirements.lock."""
import re
import tomllib

import yaml

from conftest import ROOT


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f"not an exact pin: {line!r}"
        out[norm(name)] = version.strip()
    return out


def test_environment_yml_lists_the_same_packages_and_versions_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pins(project["dependencies"]) == pins(pip_section)
    assert "python=3.11" in env["dependencies"]


def test_lock_file_pins_every_direct_dependency_at_the_same_version():
    project = pins(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    lock = pins((ROOT / "requirements.lock").read_text().splitlines())
    assert {k: lock.get(k) for k in project} == project
    assert lock["torch"] == "2.14.1" and lock["torchvision"] == "0.29.1"
