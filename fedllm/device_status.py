"""`fedllm client status`: what a device's state store says about it, for its operator."""

from __future__ import annotations

from fedllm.state import StateStore


def status_lines(store: StateStore) -> list[str]:
    """Its model, its personal adapter's version and its ledger's epsilon, one per line."""
    from fedllm.personal_model import stored_config
    from fedllm.privacy.ledger import Ledger

    lines = [f"client {store.client_id}: state store {store.dir}"]
    info = store.model_info()
    if info is None:
        lines.append("global adapter: none received yet")
    else:
        lines.append(f"global adapter: round {info.get('global_round')} of run {info.get('run') or '-'}; "
                     f"base {info.get('base')}")
    k = stored_config(store)[0].hive.k if info is not None else 1  # model.json's settings, checked
    if k > 1:
        from fedllm.hive_device import read_choice

        kept = read_choice(store.dir) or {}  # a damaged choice is chosen again next round
        lines.append(f"hive: {k} specialists kept; "
                     + (f"chose specialist {kept.get('specialist')} in round {kept.get('round')}"
                        + (" (privately, charged)" if kept.get("private") else "") if kept else "no choice yet"))
    personal = store.personal_info()
    if personal is None:
        lines.append("personal adapter: none yet")
    else:
        spent = personal.get("epsilon")
        lines.append(f"personal adapter: {personal.get('method')} version {personal.get('version')}, from global "
                     f"round {personal.get('global_round')}, {personal.get('records_seen')} records seen, "
                     f"epsilon {'-' if spent is None else format(spent, '.3f')} when it was trained "
                     f"({personal.get('reason')})")
    if store.ledger_path.exists():
        ledger = Ledger.load(store.ledger_path)  # the chain is checked: a tampered ledger is an error here
        kinds: dict[str, int] = {}
        for charge in ledger.history:
            kinds[charge.kind] = kinds.get(charge.kind, 0) + 1
        lines.append(f"ledger: epsilon {ledger.epsilon():.3f} of target {ledger.target_epsilon:g} at delta "
                     f"{ledger.delta:g} ({ledger.accountant}); charges: "
                     + (", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"))
    else:
        lines.append("ledger: none (no private round yet)")
    return lines
