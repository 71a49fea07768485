"""Commands for the laboratory's people: accounts and API tokens, and the corrections' export."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from hematovision import stores
from hematovision.cli.common import console, fail
from hematovision.lab.accounts import AccountError
from hematovision.lab.export import export_corrections
from hematovision.settings import get_settings

users_app = typer.Typer(help="Accounts of the people and systems using the service.", no_args_is_help=True)
feedback_app = typer.Typer(help="Pathologists' corrections.", no_args_is_help=True)


def _accounts():
    return stores.accounts(get_settings())


@users_app.command("add")
def users_add(
    username: Annotated[str, typer.Argument(help="Sign-in name (lower-case letters, digits, . _ -).")],
    role: Annotated[
        list[str], typer.Option("--role", "-r", help="pathologist, engineer, ops or admin (repeat for several).")
    ],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input (scripts).")
    ] = False,
):
    """Create an account; the password is asked for (never given on the command line)."""

    password = (
        sys.stdin.readline().rstrip("\n")
        if password_stdin
        else typer.prompt("password", hide_input=True, confirmation_prompt=True)
    )
    try:
        user = _accounts().add_user(username, password, role)
    except AccountError as error:
        fail(str(error))
    console.print(f"added {user.username} ({', '.join(sorted(user.roles))})")


@users_app.command("list")
def users_list():
    """Accounts, their roles and whether they are disabled."""
    table = Table("user", "roles", "disabled", "created")
    for user in _accounts().list_users():
        table.add_row(
            user["username"], ", ".join(user["roles"]), "yes" if user["disabled"] else "", user["created_at"][:19]
        )
    Console().print(table)


@users_app.command("disable")
def users_disable(username: Annotated[str, typer.Argument()]):
    """Disable an account: its sessions and API tokens stop working at once."""
    try:
        _accounts().disable_user(username)
    except AccountError as error:
        fail(str(error))
    console.print(f"disabled {username}")


@users_app.command("token")
def users_token(
    username: Annotated[str, typer.Argument()],
    name: Annotated[str, typer.Option(help="What the token is for (e.g. the LIS bridge).")] = "api",
):
    """Create an API token for a system acting as USERNAME, valid for lab.token_days; printed once,
    only its hash is kept."""
    try:
        token = _accounts().create_token(username, name, get_settings().lab.token_days)
    except AccountError as error:
        fail(str(error))
    print(token)


@users_app.command("tokens")
def users_tokens(username: Annotated[str, typer.Argument()]):
    """USERNAME's API tokens: id (for revoke-token), name, created, expires, last used. Never the secret."""
    table = Table("id", "name", "created", "expires", "last used")
    for token in _accounts().list_tokens(username):
        expires = token["expires_at"][:19] + (" (expired)" if token["expired"] else "")
        table.add_row(
            token["id"], token["name"], token["created_at"][:19], expires, (token["last_used_at"] or "never")[:19]
        )
    Console(width=120).print(table)


@users_app.command("revoke-token")
def users_revoke_token(
    username: Annotated[str, typer.Argument()],
    token_id: Annotated[str, typer.Argument(help="The id `hematovision users tokens USERNAME` shows.")],
):
    """Revoke one API token of USERNAME at once (the others keep working); recorded in the audit log."""
    settings = get_settings()
    try:
        revoked = stores.accounts(settings).revoke_token(username, token_id)
    except AccountError as error:
        fail(str(error))
    stores.corrections(settings).audit("cli", "revoke_token", username, revoked)
    console.print(f"revoked token {revoked['id']} ({revoked['name']}) of {username}")


@feedback_app.command("export")
def feedback_export():
    """Write the corrected images as a new DVC-tracked dataset version (class folders); nothing new, no change."""
    result = export_corrections(get_settings())
    console.print(
        f"{result['images']} corrected images ({result['added']} new, {result['removed']} removed, "
        f"{result['disputed']} disputed left out) -> {result['path']} (DVC {result['dvc_file']}, md5 {result['md5']})"
    )
