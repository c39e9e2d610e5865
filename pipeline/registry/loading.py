"""Load a registered model from `models:/NAME@ALIAS` (or `models:/NAME/VERSION`) through the tracking server.

Only the tracking URI is needed: the version is resolved with the registry API and its two artifacts (the model
config JSON and the state_dict) are downloaded through the server, which proxies the artifact store
(`mlflow server --artifacts-destination s3://...`), so a client holds no storage credentials. The model is
rebuilt from this checkout's kpp with `torch.load(weights_only=True)`: nothing but tensors is unpickled, and none
of the code stored with the model runs (that is what `mlflow.pyfunc.load_model` would do).

Every refusal is a `RegistryError` (the jobs exit 2 on it) that names what is wrong: a server that is down, a
model name that does not exist (with the names that do), an alias that is not set (with the aliases that are),
a version that does not exist, data whose dataset, image shape, bit depth or episode length differ from the
version's tags (`check_data`).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any

from pipeline.registry import naming

_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


class RegistryError(ValueError):
    """Bad input for a registered-model consumer: the message names the mismatch (exit status 2)."""


class DataMismatch(RegistryError):
    """Data that the registered model was not trained for."""


@dataclass(frozen=True)
class ModelRef:
    name: str
    alias: str = ""
    version: str = ""

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def parse_model_uri(uri: str) -> ModelRef:
    m = _URI.match(uri.strip())
    if not m:
        raise RegistryError(f"--model: {uri!r} is not a registered model URI (models:/NAME@ALIAS or "
                            f"models:/NAME/VERSION)")
    return ModelRef(m["name"], m["alias"] or "", m["version"] or "")


@dataclass
class Registered:
    """A registered model version, loaded."""
    ref: ModelRef
    name: str
    version: str
    tags: dict[str, str]
    run_id: str
    model_id: str  # the LoggedModel (m-...) the version was registered from: evaluation metrics link to it
    source: str
    model: Any = None  # kpp.model.KanervaPlusPlus, in eval mode
    state_dict: dict = field(default_factory=dict, repr=False)
    config: dict = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        alias = f" ({self.ref.alias})" if self.ref.alias else ""
        return f"{self.name} version {self.version}{alias}"


def tracking_uri(uri: str = "") -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else jobs.train's default store; checked to answer."""
    from pipeline.registry.tracking import TrackingError, check_reachable, resolve_uri
    uri = resolve_uri(uri)
    try:
        check_reachable(uri)
    except TrackingError as e:
        raise RegistryError(str(e).replace("tracking.uri: ", "MLFLOW_TRACKING_URI: ", 1)) from None
    return uri


def resolve(ref: ModelRef, uri: str):
    """The ModelVersion `ref` points at; RegistryError naming what does not exist."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    client = MlflowClient(uri)
    try:
        registered = client.get_registered_model(ref.name)
    except MlflowException as e:
        if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"{ref.uri}: the registry at {uri} refused the lookup ({e})") from None
        names = sorted(m.name for m in client.search_registered_models(max_results=50))
        raise RegistryError(f"{ref.uri}: no registered model named {ref.name!r} at {uri} (registered: "
                            f"{', '.join(names) or 'none'})") from None
    if ref.alias:
        aliases = dict(registered.aliases or {})
        if ref.alias not in aliases:
            have = ", ".join(f"{a} -> version {v}" for a, v in sorted(aliases.items())) or "none"
            raise RegistryError(f"{ref.uri}: alias {ref.alias!r} is not set on {ref.name} (aliases: {have})")
        version = str(aliases[ref.alias])
    else:
        version = ref.version
    try:
        return client.get_model_version(ref.name, version)
    except MlflowException:
        raise RegistryError(f"{ref.uri}: {ref.name} has no version {version}") from None


def load(model_uri: str, uri: str = "") -> Registered:
    """Resolve and load a registered model (config + state_dict, weights_only) from this checkout's kpp."""
    import torch

    from kpp.config import KanervaConfig
    from kpp.model import KanervaPlusPlus
    ref = parse_model_uri(model_uri)
    uri = tracking_uri(uri)
    mv = resolve(ref, uri)
    source = str(mv.source or "")
    model_id = getattr(mv, "model_id", None) or (source.split("/", 1)[1] if source.startswith("models:/m-") else "")
    reg = Registered(ref=ref, name=mv.name, version=str(mv.version), tags=dict(mv.tags or {}), run_id=mv.run_id or "",
                     model_id=model_id, source=source)
    with tempfile.TemporaryDirectory(prefix="kpp-model-") as d:
        weights, config = _download(reg, uri, d)
        try:
            reg.config = json.loads(open(config).read())
            cfg = KanervaConfig.from_dict(reg.config).validate()
        except (ValueError, TypeError) as e:
            raise RegistryError(f"{ref.uri}: its model config does not build a model with this checkout's kpp "
                                f"({e})") from None
        reg.state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    model = KanervaPlusPlus(cfg)
    try:
        model.load_state_dict(reg.state_dict)
    except RuntimeError as e:
        raise RegistryError(f"{ref.uri}: its weights do not fit the model its config builds ({e})") from None
    reg.model = model.eval()
    return reg


def _download(reg: Registered, uri: str, dst: str) -> tuple[str, str]:
    """Local paths of the version's weights and config artifacts, fetched through the tracking server: first the
    MLmodel file (YAML) that names them, then the two files; never the stored code."""
    import mlflow
    import yaml
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    base = f"models:/{reg.name}/{reg.version}"  # the resolved version: an alias moved meanwhile changes nothing

    def fetch(path: str) -> str:
        try:
            return mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{path}", dst_path=dst, tracking_uri=uri)
        except Exception as e:  # noqa: BLE001 - missing artifact, store refusing: the same answer for the user
            raise RegistryError(f"{reg.ref.uri}: cannot download {path} of {reg.label} through {uri} ({e})") from None

    mlmodel = yaml.safe_load(open(fetch("MLmodel")).read())
    try:
        arts = mlmodel["flavors"]["python_function"]["artifacts"]
        return fetch(arts["weights"]["path"]), fetch(arts["config"]["path"])
    except (KeyError, TypeError):
        raise RegistryError(f"{reg.ref.uri}: {reg.label} is not a Kanerva++ model (its MLmodel names no weights "
                            f"and config artifacts)") from None


# -- the data a model may consume -------------------------------------------------------------------------------
def data_card(url: str):
    from pipeline.data.shards.manifest import read_card, read_manifest
    from pipeline.urls import redact
    try:
        read_manifest(url)
        return read_card(url)
    except Exception as e:  # noqa: BLE001 - missing, unreachable or unreadable
        raise RegistryError(f"--data: no prepared dataset at {redact(url)} (python -m jobs.prepare writes one): "
                            f"{e}") from None


def expected(reg: Registered) -> dict[str, str]:
    """What the version was trained on: its tags, else (versions registered before the tags) its config."""
    cfg = reg.model.cfg
    return {"dataset": reg.tags.get(naming.DATASET, ""),
            "image_shape": reg.tags.get(naming.IMAGE_SHAPE, naming.image_shape_tag(cfg.image_shape)),
            "bit_depth": reg.tags.get(naming.BIT_DEPTH, str(cfg.bit_depth)),
            "episode_length": reg.tags.get(naming.EPISODE_LENGTH, str(cfg.episode_length))}


def check_data(reg: Registered, card, url: str) -> list[str]:
    """DataMismatch naming every field in which the prepared data at `url` differs from what the version was
    trained on; returns warnings (a version without a dataset tag cannot have its dataset checked)."""
    from pipeline.urls import redact
    want = expected(reg)
    have = {"dataset": card.dataset, "image_shape": naming.image_shape_tag(card.image_shape),
            "bit_depth": str(card.bit_depth),
            "episode_length": str(card.episode_length or want["episode_length"])}
    what = {"dataset": "dataset", "image_shape": "image shape (CxHxW)", "bit_depth": "bit depth",
            "episode_length": "episode length of the fixed test episodes (jobs.prepare --episode-length)"}
    bad = [f"{what[k]}: the model has {want[k]}, the data has {have[k]}" for k in what
           if want[k] and want[k] != have[k]]
    if bad:
        raise DataMismatch(f"--data {redact(url)} does not match {reg.label}: " + "; ".join(bad))
    return [] if want["dataset"] else [f"{reg.label} has no {naming.DATASET} tag: the dataset was not checked"]
