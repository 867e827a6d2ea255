"""`istio-pod-network-controller inject -f FILE|-`: rewrite Istio-injected YAML to need no NET_ADMIN.

Typical use:
`istioctl kube-inject -f app.yaml | istio-pod-network-controller inject -f - | kubectl apply -f -`.
The input is split into YAML documents here (not by the YAML library) so that every document that does not
change is written back byte for byte, comments and formatting included; only rewritten documents are
re-serialized (their leading comment lines, such as helm's `# Source:`, are kept).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, BinaryIO

import click
import yaml

from ..install.injection import InjectionError, InjectOptions, rewrite_object
from .inject_options import inject_options_from, injection_options

_DOC_START = re.compile(r"^---(?=[ \t\r\n]|$)", re.MULTILINE)


@dataclass(slots=True)
class Document:
    """One document of a stream: its separator line ("" for an implicit first document) and its body."""

    separator: str
    body: str

    @property
    def text(self) -> str:
        return self.separator + self.body


def split_documents(stream: str) -> list[Document]:
    """Split on `---` lines; joining the parts' `text` gives the input back exactly."""
    documents: list[Document] = []
    starts = [m.start() for m in _DOC_START.finditer(stream)]
    if not starts or starts[0] != 0:
        documents.append(Document("", stream[: starts[0]] if starts else stream))
    for index, start in enumerate(starts):
        end = starts[index + 1] if index + 1 < len(starts) else len(stream)
        chunk = stream[start:end]
        line_end = chunk.find("\n")
        if line_end == -1:
            documents.append(Document(chunk, ""))
        else:
            documents.append(Document(chunk[: line_end + 1], chunk[line_end + 1 :]))
    return documents


def _leading_comments(body: str) -> str:
    kept = []
    for line in body.splitlines(keepends=True):
        if line.strip() and not line.lstrip().startswith("#"):
            break
        kept.append(line)
    return "".join(kept)


@dataclass(slots=True)
class InjectResult:
    output: str
    changed: int
    warnings: list[str]


def inject_stream(stream: str, options: InjectOptions) -> InjectResult:
    """Rewrite every mesh workload in a multi-document YAML stream; leave the rest byte-for-byte alone."""
    parts: list[str] = []
    changed = 0
    warnings: list[str] = []
    for number, document in enumerate(split_documents(stream), start=1):
        # The separator line may carry content (`--- {a: 1}`), so parse it together with the body.
        try:
            obj = yaml.safe_load(document.separator.removeprefix("---") + document.body)
        except yaml.YAMLError as exc:
            raise click.ClickException(f"document {number}: not valid YAML: {exc}") from None
        try:
            did_change, notes = rewrite_object(obj, options)
        except InjectionError as exc:
            raise click.ClickException(f"document {number}: {exc}") from None
        if not did_change:
            parts.append(document.text)
            continue
        changed += 1
        meta = obj.get("metadata")
        name = f"{obj.get('kind')}/{meta.get('name', '?') if isinstance(meta, dict) else '?'}"
        warnings += [f"{name}: {note}" for note in notes]
        separator = "---\n" if document.separator else ""
        dumped = yaml.safe_dump(
            obj, sort_keys=False, default_flow_style=False, allow_unicode=True, width=4096
        )
        parts.append(separator + _leading_comments(document.body) + dumped)
    return InjectResult("".join(parts), changed, warnings)


@click.command()
@click.option(
    "-f",
    "--filename",
    required=True,
    type=click.File("rb"),
    help="YAML to rewrite (istioctl kube-inject output or any workload YAML); - for standard input.",
)
@click.option(
    "-o",
    "--output",
    type=click.File("wb", atomic=True),
    default="-",
    show_default=True,
    help="Where to write the result.",
)
@injection_options(environment=False)
@click.option("-q", "--quiet", is_flag=True, help="No summary or warnings on standard error.")
def inject(filename: BinaryIO, output: BinaryIO, quiet: bool, **params: Any) -> None:
    """Replace Istio's privileged istio-init with the unprivileged waiter in Istio-injected YAML.

    Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets, ReplicationControllers, Jobs, CronJobs,
    PodTemplates, OpenShift DeploymentConfigs and `kind: List` are rewritten when they carry istio-init;
    every other document is copied unchanged, byte for byte.
    """
    options = inject_options_from(params)
    try:
        text = filename.read().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise click.ClickException(f"input is not UTF-8: {exc}") from None
    result = inject_stream(text, options)
    output.write(result.output.encode("utf-8"))
    if not quiet:
        for warning in result.warnings:
            click.echo(f"warning: {warning}", err=True)
        click.echo(f"rewrote {result.changed} object(s)", err=True)
