"""The ``enformer-score`` command line: parses options and calls the library."""
from __future__ import annotations

import click

from .errors import EnformerVepError


class _Commands(click.Group):
    """Turns the library's :class:`EnformerVepError` into a one-line ``Error: ...`` and exit 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EnformerVepError as error:
            raise click.ClickException(str(error)) from None


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="enformer-vep")
def cli():
    """Score genetic variants with DeepMind's Enformer (a faithful PyTorch port)."""


@cli.command()
@click.argument("source")
@click.argument("dest", type=click.Path(dir_okay=False))
def convert(source, dest):
    """Convert Enformer weights SOURCE once into our native DEST.safetensors.

    SOURCE is any of: a TF-Hub/Kaggle SavedModel directory or its .tar.gz; the Sonnet
    checkpoint prefix (e.g. enformer-fine-tuned-human-1, beside its .index and
    .data-00000-of-00001 files); an enformer-pytorch directory (config.json with
    pytorch_model.bin or model.safetensors); one of our .safetensors files; or an
    http(s) URL to a file of these kinds (downloaded into the cache, resumably).
    The architecture is read from the tensors; every tensor is CRC- and shape-checked.
    """
    from .weights import convert as convert_weights

    config = convert_weights(source, dest)
    heads = ", ".join(f"{name} {n}" for name, n in config.heads.items())
    click.echo(f"wrote {dest}: channels {config.channels}, {config.num_transformer_layers} transformer "
               f"layers, {config.num_heads} heads, {config.pooling_type} pooling, tracks: {heads}")


def main(argv=None):
    cli.main(args=argv, prog_name="enformer-score")
