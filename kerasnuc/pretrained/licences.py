"""The licences of the training data, in one place: keyed by dataset format (the ``FORMAT`` of a
``FORMAT:PATH`` data spec), read by the model cards (``python -m export.pretrained``), the
README's table and the tests.

A trained model is a derivative of its training data, so the strictest licence among its
datasets decides what a user may do with the model: :func:`model_terms`.
"""

import os
import re

LICENCES = {
    "dsb2018": {
        "dataset": "Data Science Bowl 2018 (BBBC038)",
        "licence": "CC0 1.0",
        "url": "https://creativecommons.org/publicdomain/zero/1.0/",
        "commercial": True, "share_alike": False, "research_only": False,
        "terms": "public domain dedication: any use, commercial included, no conditions",
        "cite": "Caicedo et al., Nature Methods 16, 1247-1253 (2019)",
    },
    "monuseg": {
        "dataset": "MoNuSeg 2018",
        "licence": "CC BY-NC-SA 4.0",
        "url": "https://creativecommons.org/licenses/by-nc-sa/4.0/",
        "commercial": False, "share_alike": True, "research_only": False,
        "terms": "research and non-commercial use, with attribution; derivatives under the same licence",
        "cite": "Kumar et al., IEEE TMI 36(7), 2017; Kumar et al., IEEE TMI 39(5), 2020",
    },
    "crchisto": {
        "dataset": "CRCHistoPhenotypes",
        "licence": "research purposes only (the dataset's Readme)",
        "url": "https://warwick.ac.uk/fac/cross_fac/tia/data/crchistolabelednucleihe",
        "commercial": False, "share_alike": False, "research_only": True,
        "terms": "research purposes only",
        "cite": "Sirinukunwattana et al., IEEE TMI 35(5), 1196-1206 (2016)",
    },
    "pannuke": {
        "dataset": "PanNuke",
        "licence": "CC BY-NC-SA 4.0",
        "url": "https://creativecommons.org/licenses/by-nc-sa/4.0/",
        "commercial": False, "share_alike": True, "research_only": False,
        "terms": "research and non-commercial use, with attribution; derivatives under the same licence",
        "cite": "Gamper et al., ECDP 2019 and arXiv:2003.10778 (2020)",
    },
}

SAMPLE_FORMAT = "dsb2018"  # the shipped ``sample`` (kerasnuc/data/sample) is a DSB 2018 subset


class LicenceError(ValueError):
    """Training data whose licence kerasnuc does not know (the message names the spec)."""


def spec_formats(spec):
    """The dataset formats a data spec names: ``"monuseg:PATH"`` -> ["monuseg"]; several specs
    joined by ``+``, ``,`` or ``;`` (or a list of specs) give one each; ``sample`` (and a
    ``folder:`` spec of the shipped sample) is DSB 2018. An unknown format is returned as it is
    (``folder`` for any other labelled folder), so :func:`licences_of` can name it."""
    if not spec:
        return []
    specs = spec if isinstance(spec, (list, tuple)) else re.split(r"\s*[+,;]\s*", str(spec).strip())
    formats = []
    for item in specs:
        item = str(item).strip()
        if not item:
            continue
        fmt, _, path = item.partition(":")
        if item == "sample" or (fmt == "folder" and _is_sample(path)):
            fmt = SAMPLE_FORMAT
        if fmt not in formats:
            formats.append(fmt)
    return formats


def _is_sample(path):
    from kerasnuc.data.spec import SAMPLE_DIR

    return os.path.abspath(path) == os.path.abspath(SAMPLE_DIR)


DATA_KEYS = ("data", "extra_train_data", "test_data")
"""The config.json keys that name datasets a run saw (``extra_train_data``: a list of specs or of
``{"data": spec, ...}``)."""


def data_specs(config):
    """Every dataset spec a run's config names, in :data:`DATA_KEYS` order."""
    def walk(value):
        if isinstance(value, dict):
            yield from walk(value.get("data"))
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from walk(item)
        elif value:
            yield str(value)

    return [spec for key in DATA_KEYS for spec in walk(config.get(key))]


def licences_of(config):
    """[{format, dataset, licence, url, terms, cite, ...}] of a run's training and test data
    (:func:`data_specs`); LicenceError for a dataset not in :data:`LICENCES` (a model must not
    ship with data of unknown terms)."""
    formats = []
    specs = data_specs(config)
    for spec in specs:
        formats += [fmt for fmt in spec_formats(spec) if fmt not in formats]
    unknown = [fmt for fmt in formats if fmt not in LICENCES]
    if unknown:
        raise LicenceError(f"data {', '.join(specs)}: no licence known for format {', '.join(unknown)} "
                           f"(known: {', '.join(sorted(LICENCES))}); add the dataset to "
                           "kerasnuc/pretrained/licences.py first")
    return [{"format": fmt, **LICENCES[fmt]} for fmt in formats]


def model_terms(licences):
    """What the datasets' licences mean for a model trained on them: a dict with
    ``commercial``, ``share_alike``, ``research_only`` and ``summary`` (one paragraph for users)."""
    research_only = any(item["research_only"] for item in licences)
    share_alike = any(item["share_alike"] for item in licences)
    commercial = all(item["commercial"] for item in licences)
    names = ", ".join(f"{item['dataset']} ({item['licence']})" for item in licences)
    if research_only:
        strict = [item["dataset"] for item in licences if item["research_only"]]
        summary = (f"Research use only. The model is trained on {', '.join(strict)}, released for research "
                   "purposes only, and a trained model derives from its data: use it in research (papers, "
                   "method comparisons, teaching); do not use it in a product, a paid service, clinical or "
                   "diagnostic work, and do not redistribute it for such uses. Ask the dataset's owners for "
                   "anything else.")
    elif not commercial:
        strict = [item["dataset"] for item in licences if not item["commercial"]]
        summary = (f"Non-commercial use only, share-alike. The model is trained on {', '.join(strict)} "
                   "(CC BY-NC-SA 4.0) and is a derivative of it: you may use, adapt and share it for "
                   "research and other non-commercial purposes, crediting the datasets (see citations); "
                   "models or outputs you distribute that build on it must carry the same licence "
                   "(CC BY-NC-SA 4.0); commercial use needs the data owners' permission.")
    else:
        summary = ("No restrictions from the training data: every dataset is public domain (CC0 1.0); "
                   "any use, commercial included. Citing the datasets is good practice.")
    if share_alike and research_only:
        summary += " Its CC BY-NC-SA 4.0 data also require the same licence for anything shared."
    return {"commercial": commercial, "share_alike": share_alike, "research_only": research_only,
            "datasets": names, "summary": summary}
