"""Layer-aware shipping's pure parts and its local halves: chain IDs, what a host lacks, the stream a host
receives (decoded and read back as the tar `docker load` gets), the ImageLayers fact, and the OpenSSH argv and
sender (run against a local shell in place of ssh)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile

import pytest
from ingestctl import image_layers, openssh
from ingestctl.errors import EnvironmentMissing, HostError
from ingestctl.facts.docker import HostLayers, ImageLayers
from ingestctl.image_layers import Codec, LayeredImage, Shipment
from ingestctl.operations import images as ops
from pyinfra.api.exceptions import FactProcessError


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


LAYERS = [b"base layer" * 100, b"venv layer" * 1000, b"code layer"]
DIFF_IDS = [_digest(layer) for layer in LAYERS]


def _image(diff_ids=DIFF_IDS) -> LayeredImage:
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": list(diff_ids)}}).encode()
    return LayeredImage(image_id=_digest(config), config=config, diff_ids=tuple(diff_ids))


def test_chain_ids_follow_the_oci_definition():
    a, b, c = DIFF_IDS
    chain_b = _digest(f"{a} {b}".encode())
    assert image_layers.chain_ids([a, b, c]) == [a, chain_b, _digest(f"{chain_b} {c}".encode())]
    assert image_layers.chain_ids([]) == []


def test_a_host_without_layers_gets_every_layer_once():
    repeated = [DIFF_IDS[0], DIFF_IDS[1], DIFF_IDS[1]]
    assert image_layers.layers_to_send([repeated], []) == (DIFF_IDS[0], DIFF_IDS[1])


def test_a_host_with_the_previous_release_gets_only_the_changed_layer():
    previous = [*DIFF_IDS[:2], _digest(b"old code")]
    present = image_layers.chain_ids(previous)
    assert image_layers.layers_to_send([DIFF_IDS], present) == (DIFF_IDS[2],)


def test_the_same_layer_on_another_base_is_not_the_same_layer():
    """A layer is reusable only with everything beneath it: its diffID alone on the host proves nothing."""
    other_base = image_layers.chain_ids([_digest(b"other base"), DIFF_IDS[1]])
    assert image_layers.layers_to_send([DIFF_IDS], [*other_base, DIFF_IDS[1]]) == tuple(DIFF_IDS)


def test_images_sharing_a_base_send_the_base_once():
    """The db host's postgres and redis images share their base: one stream carries it once."""
    redis = [DIFF_IDS[0], _digest(b"redis")]
    assert image_layers.layers_to_send([DIFF_IDS, redis], []) == (*DIFF_IDS, redis[1])


def test_a_complete_image_sends_no_layers():
    assert image_layers.layers_to_send([DIFF_IDS], image_layers.chain_ids(DIFF_IDS)) == ()


@pytest.fixture
def cached(tmp_path, monkeypatch):
    """The three layers' frames in a fresh cache, written the way ensure_layers writes them."""
    monkeypatch.setenv("INGESTCTL_ROOT", str(tmp_path))
    image_layers.cache_dir().mkdir(parents=True)
    codecs = [Codec.GZIP] + ([Codec.ZSTD] if shutil.which("zstd") else [])
    for data, diff_id in zip(LAYERS, DIFF_IDS, strict=True):
        source = tmp_path / "layer"
        source.write_bytes(data)
        for codec in codecs:
            image_layers._write_frame(source, diff_id, codec)
    return codecs


def _decoded(shipment: Shipment) -> bytes:
    stream = b"".join(shipment.chunks())
    if shipment.codec is Codec.GZIP:
        return gzip.decompress(stream)
    return subprocess.run(["zstd", "-dcq"], input=stream, capture_output=True, check=True).stdout


def test_the_stream_is_the_tar_docker_load_expects_with_only_the_missing_layers(cached):
    image = _image()
    for codec in cached:
        shipment = Shipment((image,), (DIFF_IDS[2],), codec)
        with tarfile.open(fileobj=io.BytesIO(_decoded(shipment))) as archive:
            names = archive.getnames()
            manifest = json.loads(archive.extractfile("manifest.json").read())
            config = archive.extractfile(image.config_name).read()
            code = archive.extractfile(image_layers.layer_member_name(DIFF_IDS[2])).read()
        assert names == [image_layers.layer_member_name(DIFF_IDS[2]), image.config_name, "manifest.json"], codec
        assert manifest == [{"Config": image.config_name, "RepoTags": None,
                             "Layers": [image_layers.layer_member_name(d) for d in DIFF_IDS]}]
        assert _digest(config) == image.image_id
        assert code == LAYERS[2]
        assert shipment.size() == len(b"".join(shipment.chunks()))


def test_one_stream_carries_several_images_with_a_manifest_entry_each(cached):
    first, second = _image(DIFF_IDS[:2]), _image(DIFF_IDS)
    shipment = Shipment((first, second), tuple(DIFF_IDS), Codec.GZIP)
    with tarfile.open(fileobj=io.BytesIO(_decoded(shipment))) as archive:
        manifest = json.loads(archive.extractfile("manifest.json").read())
        assert [_digest(archive.extractfile(entry["Config"]).read()) for entry in manifest] == [
            first.image_id, second.image_id]
    assert [len(entry["Layers"]) for entry in manifest] == [2, 3]


def test_a_full_stream_carries_every_layer_byte_for_byte(cached):
    shipment = Shipment((_image(),), tuple(DIFF_IDS), Codec.GZIP)
    with tarfile.open(fileobj=io.BytesIO(_decoded(shipment))) as archive:
        for data, diff_id in zip(LAYERS, DIFF_IDS, strict=True):
            assert archive.extractfile(image_layers.layer_member_name(diff_id)).read() == data


def test_frames_are_deterministic(cached, tmp_path):
    first = image_layers.frame_path(DIFF_IDS[1], Codec.GZIP).read_bytes()
    source = tmp_path / "again"
    source.write_bytes(LAYERS[1])
    image_layers._write_frame(source, DIFF_IDS[1], Codec.GZIP)
    assert image_layers.frame_path(DIFF_IDS[1], Codec.GZIP).read_bytes() == first


def test_cached_image_needs_its_config_and_every_frame(cached):
    image = _image()
    assert image_layers.cached_image(image.image_id, Codec.GZIP) is None  # no config yet
    image_layers.config_path(image.image_id).write_bytes(image.config)
    assert image_layers.cached_image(image.image_id, Codec.GZIP) == image
    image_layers.frame_path(DIFF_IDS[0], Codec.GZIP).unlink()
    assert image_layers.cached_image(image.image_id, Codec.GZIP) is None


def test_a_config_that_does_not_hash_to_the_image_id_is_refused(cached):
    image = _image()
    image_layers.config_path(image.image_id).write_bytes(image.config + b" ")
    assert image_layers.cached_image(image.image_id, Codec.GZIP) is None


def test_prune_keeps_only_what_kept_images_use(cached):
    image = _image(DIFF_IDS[:2])
    image_layers.config_path(image.image_id).write_bytes(image.config)
    gone = _image([DIFF_IDS[2]])
    image_layers.config_path(gone.image_id).write_bytes(gone.config)
    removed = image_layers.prune(keep_images={image.image_id})
    assert image_layers.config_path(gone.image_id) in removed
    assert not image_layers.frame_path(DIFF_IDS[2], Codec.GZIP).exists()
    assert image_layers.frame_path(DIFF_IDS[1], Codec.GZIP).exists()


# -- the ImageLayers fact ----------------------------------------------------------------------------------

CLASSIC = 'store [["Backing Filesystem","extfs"],["Supports d_type","true"]]'


def test_image_layers_fact_collects_every_chain():
    layers = ImageLayers().process([CLASSIC, "zstd yes", f"layers {json.dumps(DIFF_IDS[:2])}", "layers null"])
    assert layers == HostLayers(chains=frozenset(image_layers.chain_ids(DIFF_IDS[:2])),
                                skips_present_layers=True, has_zstd=True)


def test_image_layers_fact_on_the_containerd_store_reuses_nothing():
    store = 'store [["driver-type","io.containerd.snapshotter.v1"]]'
    layers = ImageLayers().process([store, "zstd no", f"layers {json.dumps(DIFF_IDS)}"])
    assert not layers.skips_present_layers and not layers.has_zstd
    assert ops.plan_shipment([_image()], layers, Codec.GZIP).layers == tuple(DIFF_IDS)


@pytest.mark.parametrize("line", [
    'layers ["sha256:abc"]',
    "layers {\"a\": 1}",
    "layers not json",
    "rm -rf /",
])
def test_image_layers_fact_refuses_what_ingestctl_did_not_ask_for(line):
    with pytest.raises(FactProcessError, match="image layers"):
        ImageLayers().process([CLASSIC, "zstd yes", line])


def test_image_layers_fact_needs_the_engines_answer():
    with pytest.raises(FactProcessError, match="storage driver"):
        ImageLayers().process(["zstd yes"])


def test_codec_is_zstd_only_where_both_ends_have_it():
    with_zstd = HostLayers(chains=frozenset(), skips_present_layers=True, has_zstd=True)
    without = HostLayers(chains=frozenset(), skips_present_layers=True, has_zstd=False)
    assert ops.choose_codec(with_zstd, (Codec.ZSTD, Codec.GZIP)) is Codec.ZSTD
    assert ops.choose_codec(with_zstd, (Codec.GZIP,)) is Codec.GZIP
    assert ops.choose_codec(without, (Codec.ZSTD, Codec.GZIP)) is Codec.GZIP


# -- OpenSSH -----------------------------------------------------------------------------------------------

SANDBOX = {"ssh_hostname": "172.18.0.3", "ssh_port": 22, "ssh_user": "root", "ssh_key": "/k/id",
           "ssh_known_hosts_file": "/dev/null", "ssh_strict_host_key_checking": "no"}


def test_ssh_argv_reaches_the_host_as_pyinfra_does(tmp_path):
    argv = openssh.ssh_argv("app2", SANDBOX, "docker load", tmp_path)
    assert argv == [
        "ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=10",
        "-o", "ServerAliveCountMax=3", "-o", "StrictHostKeyChecking=no", "-o", "LogLevel=ERROR",
        "-o", "ControlMaster=auto", "-o", f"ControlPath={tmp_path}/%C", "-o", "ControlPersist=60",
        "-o", "UserKnownHostsFile=/dev/null", "-i", "/k/id", "-o", "IdentitiesOnly=yes", "-p", "22",
        "-l", "root", "172.18.0.3", "--", "docker load",
    ]


def test_ssh_argv_for_a_sudo_user_runs_the_command_as_root():
    argv = openssh.ssh_argv("web1", {"ssh_user": "deploy", "_sudo": True}, "zstd -dcq | docker load", None)
    assert argv[-3:] == ["web1", "--", "sudo -n sh -c 'zstd -dcq | docker load'"]
    assert "StrictHostKeyChecking=accept-new" in argv  # pyinfra's default
    assert not any(arg.startswith("ControlPath") for arg in argv)


def test_send_feeds_every_chunk_and_reports_progress(tmp_path, monkeypatch):
    monkeypatch.setattr(openssh, "PROGRESS_EVERY_S", 0.0)
    target = tmp_path / "received"
    seen = []
    chunks = [b"a" * 1000, b"b" * 2000]
    openssh.send("app2", ["sh", "-c", f"cat > {target}"], iter(chunks), 3000, seen.append)
    assert target.read_bytes() == b"".join(chunks)
    assert [p.sent for p in seen] == [1000, 3000]
    assert seen[-1].describe().startswith("app2: 0.0 of 0.0 MB (")


def test_send_names_the_host_and_the_remote_error():
    with pytest.raises(HostError, match=r"host app3: stream of \d+ bytes failed \(exit 3\): no space left"):
        openssh.send("app3", ["sh", "-c", "head -c 10 >/dev/null; echo 'no space left' >&2; exit 3"],
                     iter([b"x" * 100_000] * 50), 5_000_000)


def test_control_dir_refuses_one_another_user_could_reach(tmp_path, monkeypatch):
    monkeypatch.setattr(openssh.tempfile, "gettempdir", lambda: str(tmp_path))
    assert openssh.control_dir().stat().st_mode & 0o777 == 0o700
    openssh.control_dir().chmod(0o777)
    with pytest.raises(EnvironmentMissing, match="mode 0700, found uid .* mode 0o777; remove it"):
        openssh.control_dir()
