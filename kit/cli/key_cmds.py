"""`kit keys new | list | show | sign`: the signing keys (thin over :mod:`kit.signing`)."""

from __future__ import annotations

import click

from kit.cli._common import Context, emit_json, json_option, pass_kit, table
from kit.errors import SigningKeyError
from kit.signing import KeyStore, SigningKey


def _store(k: Context) -> KeyStore:
    if k.config.keys_dir is None:  # pragma: no cover - load_config always sets one
        raise SigningKeyError("No key folder configured; set keys_dir in kit.toml or KIT_KEYS_DIR.")
    return KeyStore(k.config.keys_dir)


@click.group("keys")
def keys_group() -> None:
    """Signing keys: register signs meta.json and the gate signs its result with the default key;
    services, the gate and run.sh trust the public keys they are given."""


@keys_group.command("new")
@click.option("--no-default", is_flag=True, help="Do not make the new key the one that signs.")
@json_option
@pass_kit
def new_cmd(k: Context, no_default: bool, as_json: bool) -> None:
    """Make an Ed25519 key pair in the key folder (private key mode 0600, never in the registry)."""
    key = _store(k).new(make_default=not no_default)
    if as_json:
        return emit_json({"key_id": key.key_id, "public_key": key.public.text(), "private_key": str(key.path)})
    click.echo(f"made key {key.key_id}{'' if no_default else ' (signs from now on)'}\n"
               f"  private key: {key.path} (keep it here; back it up; never copy it into a registry)\n"
               f"  public key:  {key.public.text()}\n"
               "Services trust it once its public key is in service.toml [trust] public_keys "
               "(`kit service new` writes the project's key there).")


@keys_group.command("list")
@json_option
@pass_kit
def list_cmd(k: Context, as_json: bool) -> None:
    """The keys in the key folder and the extra trusted keys of the config."""
    store = _store(k)
    default = store.default_id()
    rows = [{"key_id": kid, "default": kid == default, "private": store.has_private(kid), "source": str(store.root),
             "public_key": store.public(kid).text()} for kid in store.key_ids()]
    if k.config.signing_key is not None:
        sk = SigningKey.load(k.config.signing_key)
        rows.insert(0, {"key_id": sk.key_id, "default": True, "private": True, "source": str(sk.path),
                        "public_key": sk.public.text()})
        for r in rows[1:]:
            r["default"] = False
    from kit.signing import Trust

    for pk in Trust.from_texts(k.config.trusted_keys, "trusted_keys").keys:
        rows.append({"key_id": pk.key_id, "default": False, "private": False, "source": "trusted_keys",
                     "public_key": pk.text()})
    if as_json:
        return emit_json(rows)
    if not rows:
        click.echo(f"No keys in {store.root}. Make one with `kit keys new` (registering a model makes one too).")
        return
    click.echo(table([[r["key_id"], "yes" if r["default"] else "", "yes" if r["private"] else "public only",
                       r["source"]] for r in rows], ["KEY ID", "SIGNS", "PRIVATE KEY", "WHERE"]))


@keys_group.command("show")
@click.argument("key_id", required=False)
@click.option("--pem", is_flag=True, help="PEM (SubjectPublicKeyInfo), for openssl and run.sh's KIT_TRUST.")
@pass_kit
def show_cmd(k: Context, key_id: str | None, pem: bool) -> None:
    """Print a public key (default: the one that signs), as service.toml [trust] takes it."""
    if key_id is None and k.config.signing_key is not None:
        pub = SigningKey.load(k.config.signing_key).public
    else:
        store = _store(k)
        kid = key_id or store.default_id()
        if kid is None:
            raise SigningKeyError(f"No keys in {store.root}. Make one with `kit keys new`.")
        pub = store.public(kid)
    click.echo(pub.pem() if pem else pub.text(), nl=not pem)


@keys_group.command("sign")
@click.argument("ref", metavar="NAME@VERSION")
@json_option
@pass_kit
def sign_cmd(k: Context, ref: str, as_json: bool) -> None:
    """Sign an existing version's meta.json (e.g. one registered before signing), after re-hashing its
    files. Sign only versions you know are yours: a signature is what services trust."""
    from kit.registry import parse_ref

    reg = k.registry()
    name, sel = parse_ref(ref)
    mv = reg.get(name, sel)
    key_id = reg.sign_version(mv.name, mv.version)
    if as_json:
        return emit_json({"signed": mv.ref, "artifact_sha256": mv.artifact_sha256, "key_id": key_id})
    click.echo(f"signed {mv.ref} (meta.json, artifact {mv.short_sha}) with key {key_id}")


def register(cli: click.Group) -> None:
    cli.add_command(keys_group)
