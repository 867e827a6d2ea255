"""Issue 12 attack 1, rule-text injection, tried at every layer the way a tenant would try it.

- Parse: hostile values for every annotation and every setting's flag / IPNC_* variable are refused with a
  SpecError naming the input (shown escaped and cut), or they parse to typed values whose rules, loaded
  into scratch namespaces by every backend for both families, hold only what the plan produced.
- Render: a spec forged past the parser (a scoped IPv6 network, a quoted interface name) makes the
  renderers raise RenderInvariantError; nothing reaches a tool.
- Execute: nft input with `include` is refused, and an include forced past that check still cannot read a
  file (Landlock); tool output never becomes a public message.

`make soak` runs every property at 10,000 examples per input (HYPOTHESIS_PROFILE=soak).
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostile_values import (
    IPTABLES_ATTACK,
    NFT_ATTACK,
    assert_loads_only_the_plan,
    assert_refusal_names,
    hostile,
)
from istio_pod_network_controller.cli.rules import rules as rules_cli
from istio_pod_network_controller.cli.spec_options import env_name, flag_name, source_name
from istio_pod_network_controller.dataplane import landlock, netns, tools
from istio_pod_network_controller.errors import (
    DETAIL_LENGTH,
    RenderInvariantError,
    SpecError,
    ToolError,
    UnsafeRuleText,
)
from istio_pod_network_controller.rules import iptables, nftables, plan
from istio_pod_network_controller.rules.invariants import check_nft, check_restore
from istio_pod_network_controller.rules.model import FamilyRules, Ruleset
from istio_pod_network_controller.settings import annotations as ann
from istio_pod_network_controller.settings.spec import (
    SETTINGS,
    InterceptSpec,
    IPv6Policy,
    Setting,
    build_spec,
)

ANNOTATION_SETTINGS = [(key, s) for s in SETTINGS for key in s.annotations]
SLOW = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- parse: every input --------------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.parametrize(("key", "setting"), ANNOTATION_SETTINGS, ids=[k for k, _ in ANNOTATION_SETTINGS])
@SLOW
@given(data=st.data(), capture_v6=st.booleans())
def test_hostile_annotation_is_refused_by_name_or_loads_only_the_plan(
    key: str, setting: Setting, data: st.DataObject, capture_v6: bool
) -> None:
    raw = data.draw(hostile(setting.parse))
    annotations = {key: raw}
    if capture_v6 and key != ann.IPV6:
        annotations[ann.IPV6] = "capture"
    try:
        spec = build_spec(annotations)
    except SpecError as exc:
        assert_refusal_names(exc, f"annotation {key}", raw)
        return
    assert_loads_only_the_plan(spec)


@pytest.mark.root
@pytest.mark.parametrize("setting", SETTINGS, ids=[s.name for s in SETTINGS])
@SLOW
@given(data=st.data(), via=st.sampled_from(["flag", "env"]), output=st.sampled_from(["iptables", "nftables"]))
def test_hostile_flag_or_variable_is_refused_by_name_or_loads_only_the_plan(
    setting: Setting, data: st.DataObject, via: str, output: str
) -> None:
    """A controller-wide setting (its flag, or its IPNC_* variable: one click option) through `rules render`:
    one clean refusal line naming both, or valid rules; and the same raw value, parsed as the controller's
    default, is refused by name or loads only the plan. (A variable cannot hold NUL: such values go by flag.)
    """
    name = setting.name
    raw = data.draw(hostile(setting.parse))
    if via == "env" and "\0" in raw:
        via = "flag"
    argv = ["render", "--format", output, *([flag_name(name), raw] if via == "flag" else [])]
    result = CliRunner().invoke(rules_cli, argv, env={env_name(name): raw} if via == "env" else {})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    try:
        spec = build_spec({ann.IPV6: "capture"}, {name: raw}, default_source=source_name)
    except SpecError as exc:
        refused: SpecError | None = exc
    else:
        refused = None
    unset = via == "env" and raw == ""  # click reads an empty variable as no variable
    if refused is not None:
        assert_refusal_names(refused, source_name(name), raw)
    if refused is not None and not unset:
        assert result.exit_code == 2
        assert result.stderr == f"error: {refused.public}\n"
        return
    assert result.exit_code == 0, result.output
    _check_cli_output(output, result.stdout)
    if refused is None:
        assert_loads_only_the_plan(spec)


def _check_cli_output(output: str, text: str) -> None:
    if output == "nftables":
        assert not text or check_nft(text, nftables.TABLE)
        return
    for block in text.split("# IPv")[1:]:
        body = "".join(f"{line}\n" for line in block.splitlines()[1:] if not line.startswith("#"))
        check_restore(body, tables={line[1:] for line in body.splitlines() if line.startswith("*")})


# --- the issue's exact attacks -------------------------------------------------------------------------


@pytest.mark.parametrize("attack", [IPTABLES_ATTACK, NFT_ATTACK], ids=["iptables", "nftables"])
@pytest.mark.parametrize(
    "key", [ann.EXCLUDE_OUTBOUND_IP_RANGES, ann.INCLUDE_OUTBOUND_IP_RANGES, ann.EXCLUDE_INTERFACES]
)
def test_issue12_attack_strings_are_refused_naming_the_annotation(attack: str, key: str) -> None:
    with pytest.raises(SpecError) as caught:
        build_spec({ann.IPV6: "capture", key: attack})
    assert_refusal_names(caught.value, f"annotation {key}", attack)
    assert "\n" not in caught.value.public


def test_a_scoped_ipv6_cidr_is_refused_even_when_the_scope_is_harmless() -> None:
    for value in ("fe80::%lo", "fe80::%1/128", "fe80::/10,fe80::%eth0"):
        with pytest.raises(SpecError, match="scope"):
            build_spec({ann.EXCLUDE_OUTBOUND_IP_RANGES: value})


def _forged(**fields: object) -> InterceptSpec:
    """A spec built past the parser, as a future code path that forgets to parse might build it."""
    return InterceptSpec(ipv6=IPv6Policy.CAPTURE, **fields)  # type: ignore[arg-type]


FORGED = {
    "scoped-cidr-iptables-attack": {"exclude_outbound_ip_ranges": (ipaddress.ip_network(IPTABLES_ATTACK),)},
    "scoped-cidr-nft-attack": {"exclude_outbound_ip_ranges": (ipaddress.ip_network(NFT_ATTACK),)},
    "scoped-include-range": {"include_outbound_ip_ranges": (ipaddress.ip_network("fd00::%x {"),)},
    "quoted-interface": {"exclude_interfaces": ('eth0" accept\ninclude "/etc/shadow',)},
    "option-interface": {"exclude_interfaces": ("-jACCEPT",)},
    "spaced-interface": {"reroute_virtual_interfaces": ("net1 -j ACCEPT",)},
}


@pytest.mark.parametrize("fields", FORGED.values(), ids=FORGED.keys())
def test_renderers_refuse_a_spec_forged_past_the_parser(fields: dict[str, object]) -> None:
    ruleset = plan.build(_forged(**fields))
    with pytest.raises(RenderInvariantError):
        nftables.apply_script(ruleset, replace=True)
    with pytest.raises(RenderInvariantError):
        _each_family(ruleset, iptables.render)
    with pytest.raises(RenderInvariantError):
        _each_family(ruleset, lambda family: iptables.apply_transaction(family, {}))


def _each_family(ruleset: Ruleset, render: Callable[[FamilyRules], str]) -> None:
    for family in ruleset.families:
        render(family)


@pytest.mark.parametrize(
    "text",
    [
        "*nat\n-A ISTIO_OUTPUT -d fe80::%lo -j RETURN\nCOMMIT\n",
        "*nat\n-A ISTIO_OUTPUT -o eth0 -j RETURN\nCOMMIT\n*filter\n-A INPUT -j ACCEPT\nCOMMIT\n",
        "*nat\n-A ISTIO_OUTPUT -o -j -j RETURN\nCOMMIT\n",
        '*nat\n-A ISTIO_OUTPUT -m comment --comment "x" -j RETURN\nCOMMIT\n',
        "*nat\n-A ISTIO_OUTPUT -j RETURN\n",
        "*nat\n-A ISTIO_OUTPUT -j RETURN COMMIT\nCOMMIT\n",
        "*nat\n-A ISTIO_OUTPUT\t-j RETURN\nCOMMIT\n",
        "*nat\n-A ISTIO_OUTPUT -j RETURN # x\nCOMMIT\n",
    ],
)
def test_restore_invariant_refuses_what_no_renderer_writes(text: str) -> None:
    with pytest.raises(RenderInvariantError):
        check_restore(text, tables={"nat"})


@pytest.mark.parametrize(
    "rule",
    [
        "ip6 daddr fe80::%lo return",
        'iifname "lo" return; flush ruleset',
        'iifname "lo\\" accept" return',
        "ip daddr { 10.0.0.0/8 } return",
        "tcp dport != { 53, include } return",
        "tcp dport { 53, 15008 return",
        "tcp dport != { 53 } } return",
        "meta mark { 1 } return",
        'include "/etc/shadow"',
        "jump nowhere",
        "return # comment",
        "ip daddr $x return",
    ],
)
def test_nft_invariant_refuses_what_no_renderer_writes(rule: str) -> None:
    text = f"table inet {nftables.TABLE} {{\n\tchain nat4_ISTIO_OUTPUT {{\n\t\t{rule}\n\t}}\n}}\n"
    with pytest.raises(RenderInvariantError):
        check_nft(text, nftables.TABLE)


def test_nft_invariant_accepts_istios_destination_port_set() -> None:
    """Istio's `! --dports 53,15008` as nft writes it: the one set shape a renderer of ours produces."""
    rule = 'oifname "lo" tcp dport != { 53, 15008 } meta skuid 1337 return'
    text = f"table inet {nftables.TABLE} {{\n\tchain nat4_ISTIO_OUTPUT {{\n\t\t{rule}\n\t}}\n}}\n"
    assert check_nft(text, nftables.TABLE) == text


# --- execute: nft reads no file, tool output stays in the log -------------------------------------------


@pytest.mark.parametrize(
    "stdin",
    ['include "/etc/passwd"\n', "table inet x {}\nINCLUDE '/etc/passwd'\n", 'flush ruleset;include "x"'],
)
def test_nft_input_with_include_never_reaches_nft(stdin: str) -> None:
    with pytest.raises(UnsafeRuleText) as caught:
        tools.run(["nft", "-f", "-"], stdin=stdin)
    assert "/etc" not in caught.value.public and "passwd" not in caught.value.public


def test_nft_reads_rules_from_stdin_only() -> None:
    with pytest.raises(UnsafeRuleText):
        tools.run(["nft", "-f", "/etc/nftables.conf"])


@pytest.fixture
def secret_file() -> tuple[Path, str]:
    """A readable file in /etc, standing in for /etc/shadow, with a line nobody else could know."""
    secret = f"ipnc-secret-{uuid.uuid4().hex}"
    path = Path(f"/etc/ipnc-test-{uuid.uuid4().hex[:12]}.conf")
    path.write_text(f"{secret}\n")
    try:
        yield path, secret
    finally:
        path.unlink()


@pytest.mark.root
def test_an_include_forced_past_every_check_cannot_read_a_file(secret_file: tuple[Path, str]) -> None:
    """Landlock: the include resolves to EACCES under confinement, and the same call unconfined would have
    quoted the file (the control that shows this test can fail)."""
    path, secret = secret_file
    assert landlock.abi() >= 1, "this kernel has no Landlock: nft would run unconfined"
    confine = tools.nft_confinement()
    assert confine is not None
    forced = f'include "{path}"\n'

    def attempt(hook: object) -> ToolError:
        with pytest.raises(ToolError) as caught:
            tools._execute(["nft", "-f", "-"], forced, None, hook)  # type: ignore[arg-type]
        return caught.value

    confined, unconfined = netns.run_in_scratch(lambda: (attempt(confine), attempt(None)))
    assert "Permission denied" in confined.detail
    assert secret not in confined.detail and secret not in confined.public
    assert secret in unconfined.detail, "control: unconfined nft does read and quote the file"
    assert secret not in unconfined.public


@pytest.mark.root
def test_confined_nft_still_loads_and_lists_our_table() -> None:
    spec = build_spec({ann.IPV6: "capture", ann.EXCLUDE_INTERFACES: "eth1"})
    ruleset = plan.build(spec)

    def work() -> str:
        tools.run(["nft", "-f", "-"], stdin=nftables.apply_script(ruleset, replace=False))
        return tools.run(["nft", "list", "table", "inet", nftables.TABLE])

    listing = netns.run_in_scratch(work)
    assert 'oifname "eth1" return' in listing


@pytest.mark.root
def test_tool_output_goes_to_the_log_escaped_and_cut_never_to_the_public_sentence() -> None:
    hostile_line = "\x1b[2J\u2028pid 4242 netns:[4026531840] " + "A" * 5000

    def work() -> ToolError:
        with pytest.raises(ToolError) as caught:
            tools._execute(["nft", "-f", "-"], f"table inet t {{ {hostile_line} }}\n", None, None)
        return caught.value

    error = netns.run_in_scratch(work)
    assert error.public == "nft refused the change (exit status 1); its output is in the controller's log"
    assert "\x1b" not in error.detail and "\u2028" not in error.detail and "\n" not in error.detail
    assert "\\x1b" in error.detail
    assert len(error.detail) <= DETAIL_LENGTH + 40
    assert str(error) == error.detail


def test_a_refusal_shows_control_characters_escaped_and_bounds_its_length() -> None:
    raw = "80\n-A INPUT -j ACCEPT\u2028\x00" + "9" * 10_000
    with pytest.raises(SpecError) as caught:
        build_spec({ann.EXCLUDE_OUTBOUND_PORTS: raw})
    error = caught.value
    assert error.value == raw
    assert error.public == str(error)
    assert error.public.isprintable() and len(error.public) < 400
    assert "'80\\n-A INPUT -j ACCEPT\\u2028\\x00" in error.public


def test_a_nul_byte_never_reaches_a_tool() -> None:
    with pytest.raises(UnsafeRuleText):
        tools.run(["iptables-nft-restore", "--test"], stdin="*nat\nCOMMIT\n\0")


@pytest.mark.root
def test_an_interface_named_include_is_a_name_not_a_statement() -> None:
    """The kernel allows an interface called `include`; quoted, nft reads it as a name and opens nothing."""
    spec = build_spec({ann.EXCLUDE_INTERFACES: "include,COMMIT"})
    assert spec.exclude_interfaces == ("include", "COMMIT")
    assert_loads_only_the_plan(spec)


def test_a_confinement_that_fails_starts_no_tool() -> None:
    def refuse() -> None:
        raise OSError(1, "landlock_restrict_self")

    with pytest.raises(ToolError) as caught:
        tools._execute(["nft", "list", "ruleset"], None, None, refuse)
    assert caught.value.public == "nft could not be started confined"
