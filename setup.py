"""Packages of the wheel: fastwidth and its subpackages, and configs/ installed as fastwidth/configs.

Every other setting is in pyproject.toml; setup.py exists because pyproject's `packages.find`
cannot add a package from outside the package tree (configs/ must stay where it is).
"""
from pathlib import Path

from setuptools import find_packages, setup

CONFIG_PACKAGES = ["fastwidth.configs" + "".join("." + part for part in d.relative_to("configs").parts)
                   for d in [Path("configs"), *sorted(p for p in Path("configs").rglob("*") if p.is_dir())]]

setup(packages=find_packages(include=["fastwidth", "fastwidth.*"]) + CONFIG_PACKAGES,
      package_dir={"fastwidth.configs": "configs"})
