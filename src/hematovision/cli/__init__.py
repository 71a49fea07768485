"""The ``hematovision`` command: the lifecycle's steps, for people and for scripts.

Every command is registered here, in the order ``--help`` lists them; each lives in the module of
its audience: ``lifecycle`` (the main job, its steps, the registry, retraining, the demo),
``service`` (serving and local predictions), ``people`` (accounts, corrections), ``monitor``
(drift), ``evidence`` (cross-validating recipes), ``deploy`` (lab mode: the Prefect deployments),
``database`` (the stores' schema migrations, ``hematovision db upgrade``). Exit codes scripts can
trust: 0 done, 1 refused or failed (the gate said no, bad input), 2 usage.
"""

from __future__ import annotations

import typer

from hematovision.cli import database, deploy, evidence, lifecycle, monitor, people, service

app = typer.Typer(
    help="HematoVision: train, evaluate, register and promote the white-blood-cell classifier.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.command()(lifecycle.run)
app.add_typer(lifecycle.data_app, name="data")
lifecycle.data_app.command("push")(deploy.data_push)
lifecycle.data_app.command("pull")(deploy.data_pull)
for command in (
    lifecycle.prepare,
    lifecycle.train,
    lifecycle.evaluate,
    lifecycle.register,
    lifecycle.promote,
    lifecycle.rollback,
    lifecycle.models,
    service.serve,
    service.predict,
):
    app.command()(command)
app.add_typer(service.predictions_app, name="predictions")
app.add_typer(people.users_app, name="users")
app.add_typer(people.feedback_app, name="feedback")
app.command()(lifecycle.retrain)
app.command()(evidence.cv)
app.command()(lifecycle.demo)
app.add_typer(monitor.monitor_app, name="monitor")
app.command()(deploy.deploy)
app.add_typer(database.db_app, name="db")

if __name__ == "__main__":
    app()
