"""The deploy under the plain pyinfra CLI:

    pyinfra inventories/staging.py deploys/deploy.py --data version=1.4.2

It converges every host to the release with the same operations `ingestctl deploy` uses (ship images, host
layout, config version, database, migration on the db host, zero-downtime slot switch), and pyinfra reports a
noop for every step already in place. What it leaves to `ingestctl deploy`: the deploy lock, batches with health,
metric and benchmark gates between them, automatic rollback, and the ledger.
"""

from ingestctl import config as config_mod
from ingestctl import hostlayout, images, runcontext
from ingestctl.operations import release as ops
from ingestctl.output import Reporter
from pyinfra import host

ctx = runcontext.prepare(host.data.env, Reporter())
built = images.build_app_image(host.data.get("version"))
release = runcontext.Release(built.version, built.name, built.id, built.labels.get(images.LABEL_SCHEMA_HEAD))
cfg = ctx.config
is_db = "db" in host.groups

ops.images_for_role_shipped(
    images_for={host.name: [release.image, ctx.infra_references["PROXY_IMAGE"]]
                + ([ctx.infra_references["POSTGRES_IMAGE"], ctx.infra_references["REDIS_IMAGE"]] if is_db else [])},
)
ops.layout_present(
    name="Ensure ingest host layout is present",
    compose_for={host.name: ctx.compose_file(host.name)},
    infra_images=ctx.infra_images, app_uid=ctx.env.data.app_uid,
)
ops.config_version_present(
    name=f"Ensure ingest config {cfg.version} is present",
    version=cfg.version, env_text=config_mod.render_env_file(cfg, secrets_dir="/run/secrets"),
    secret_files=config_mod.render_secret_files(cfg), app_uid=ctx.env.data.app_uid,
)
ops.database_running(name="Ensure PostgreSQL and Redis are running", **ctx.database_kwargs(cfg))
if is_db:
    ops.schema_migrated(
        name=f"Ensure schema is at {release.schema_head}", image=release.image, config_version=cfg.version,
        infra_images=ctx.infra_images, restore_point=f"{hostlayout.BASE}/backups/{runcontext.new_run_id()}.dump",
        target_head=release.schema_head,
    )
if "app" in host.groups:
    ops.release_live(
        name=f"Ensure ingest release {release.version} is current",
        release=release.version, image=release.image, image_id=release.image_id, config_version=cfg.version,
        infra_images=ctx.infra_images, ports=ctx.ports, clients=ctx.client_limits,
        canary_weight=ctx.env.data.canary_weight, ready_timeout_s=int(ctx.env.data.health_timeout_s),
        drain_grace_s=ctx.env.data.drain_grace_s,
        schema_head=release.schema_head, keep_standby=ctx.env.data.keep_standby,
    )
