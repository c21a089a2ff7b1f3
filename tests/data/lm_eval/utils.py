"""Local data for the test tasks: JSON files next to this file, read without the hub (lm-eval's
`custom_dataset` hook; `dataset_path: json` would resolve data files against the working directory)."""

import json
import os

import datasets

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name):
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return datasets.DatasetDict({"test": datasets.Dataset.from_list(json.load(f))})


def load_mc(**kwargs):
    return _load("tr_mc.json")


def load_gen(**kwargs):
    return _load("tr_gen.json")
