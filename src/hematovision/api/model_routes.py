"""The service's routes for engineers: which registered version is the champion.

    POST /models/{version}/promote    engineer    make ``version`` the champion through the promotion
                                                  gate (``force=true`` overrides a refusal, recorded)
    POST /models/rollback             engineer    move the champion back to the version before it

Every serving worker follows the alias by itself (``serving/swap.py``), so these routes only move
it in the registry; each decision, refused ones included, goes to the audit log.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request

from hematovision import stores
from hematovision.api.auth import read_form, require
from hematovision.api.errors import ApiError
from hematovision.params import load_params
from hematovision.registry.registry import RegistryError
from hematovision.settings import get_settings
from hematovision.training.steps import promote_step

router = APIRouter()


@router.post("/models/{version}/promote")
async def promote(request: Request, version: str) -> dict:
    """Make ``version`` the champion through the gate (``force=true`` to override, recorded)."""
    form = await read_form(request)
    user = require(request, "engineer", form=form)
    settings = get_settings()
    force = str(form.get("force", "")).lower() in ("1", "true", "yes")
    try:
        decision = promote_step(settings, load_params(settings.path(Path("params.yaml")), None), version, force)
    except RegistryError as error:
        raise ApiError(404, "unknown_version", str(error)) from None
    stores.corrections(settings).audit(
        user.username,
        "promote" if decision.passed else "promote_refused",
        version,
        {"reasons": decision.reasons, "force": force},
    )
    if not decision.passed:
        raise ApiError(409, "gate_refused", "; ".join(decision.reasons))
    return {"champion": version, "reasons": decision.reasons}


@router.post("/models/rollback")
async def rollback(request: Request) -> dict:
    user = require(request, "engineer", form=await read_form(request))
    settings = get_settings()
    try:
        old, new = stores.registry(settings).rollback()
    except RegistryError as error:
        raise ApiError(409, "cannot_roll_back", str(error)) from None
    stores.corrections(settings).audit(user.username, "rollback", new, {"from": old})
    return {"champion": new, "was": old}
