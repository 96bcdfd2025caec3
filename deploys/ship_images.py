"""Ship the images each host needs (app image, plus the db host's PostgreSQL and Redis images) without a registry.

    pyinfra inventories/local.py deploys/ship_images.py --data image=ingest:VERSION

A host that already has an image's ID under its name is left alone (noop). Otherwise a gzip'd `docker save`
(cached under .build/images/) is uploaded over SSH, its sha256 checked, then `docker load`ed and its ID
checked. With inventory data `registry`, images are pushed once and pulled by the hosts instead.
See ingestctl.operations.shipping for the inventory data it reads.
"""

from ingestctl.operations.shipping import images_shipped

images_shipped()
