"""Packaging glue: kernels/ ships as fastmtt.kernels, never as a top-level `kernels` module."""
from setuptools import setup

setup(
    packages=["fastmtt", "fastmtt.apps", "fastmtt.ops", "fastmtt.pytorch", "fastmtt.kernels"],
    package_dir={"fastmtt": "fastmtt", "fastmtt.kernels": "kernels"},
    package_data={"fastmtt.apps": ["data/*.txt"]},  # the experiment's retention text
)
