"""The ``so8t`` command: ask, chat, serve, audit verify, ollama, keygen.

Every command reads ``params.yaml`` (``--params``; its ``runtime:`` section)
from the current folder by default; relative paths in it are taken from the
folder that holds it. Messages and warnings go to stderr, results to stdout.

Exit codes: 0 success; 1 ``audit verify`` found a problem; 2 bad usage,
parameters, configuration or input.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path

from rich.markup import escape

from so8t.console import console, info, warn
from so8t.model.quantize import GGUF_GLOB

EXIT_OK, EXIT_FINDING, EXIT_ERROR = 0, 1, 2


def _params(args):
    from so8t.params import load_params

    params = load_params(args.params)
    model = getattr(args, "model", None)
    if model:
        runtime = params.runtime.model_copy(update={"model": str(Path(model).resolve())})
        params = params.model_copy(update={"runtime": runtime})
    return params, Path(args.params).resolve().parent


def _agent(args):
    from so8t.runtime.agent import build_agent

    params, base = _params(args)
    return build_agent(params, base, warn=warn, info=info)






def _principal(args):
    from so8t.runtime.agent import Principal

    return Principal.of(args.user, args.level)


#: The warning (stderr) under an answer whose grounding is ``unsupported`` (:class:`so8t.runtime.agent.Answer`).
UNSUPPORTED_WARNING = "この回答は資料を引用しておらず、資料の記述に裏付けられていません (grounding: unsupported)"


def _print_answer(ans, as_json: bool) -> None:
    """The answer on stdout (decision, text, cited documents; or its JSON), and a warning on stderr
    when the answer cites nothing and the passages do not support it."""
    if as_json:
        print(json.dumps(ans.to_dict(), ensure_ascii=False, indent=2))
    else:
        note = f"  (モデルの判定 {ans.model_decision}: {ans.override})" if ans.override else ""
        print(f"判定: {ans.decision}  確信度: {ans.confidence:.3f}{note}")
        print(ans.answer)
        if ans.citations:
            print("出典: " + ", ".join(ans.citations))
    if ans.grounding == "unsupported":
        warn(UNSUPPORTED_WARNING)


def cmd_ask(args) -> int:
    agent = _agent(args)
    try:
        _print_answer(agent.ask(args.question, _principal(args), channel="cli"), args.json)
    finally:
        agent.close()
    return EXIT_OK


def cmd_chat(args) -> int:
    agent = _agent(args)
    try:
        return _chat(agent, _principal(args), args)
    finally:
        agent.close()


def _chat(agent, who, args) -> int:
    history: list[dict] = []
    console.print(
        f"so8t chat: {agent.model.model_id} (user {who.user}, level {who.level.ja}); /exit to quit", markup=False
    )
    while True:
        try:
            line = input("あなた> ").strip()
        except EOFError:
            print()
            return EXIT_OK
        if line in ("/exit", "/quit"):
            return EXIT_OK
        if not line:
            continue
        messages = [*history, {"role": "user", "content": line}]
        ans = agent.answer(messages, who, channel="chat")
        _print_answer(ans, args.json)
        # Only what the caller saw goes back into the context: never any reasoning.
        history = [*messages, {"role": "assistant", "content": ans.answer}][-2 * args.history :] if args.history else []


def cmd_serve(args) -> int:
    from so8t.runtime.server import serve

    params, _ = _params(args)
    srv = params.runtime.server
    serve(args.params, args.host or srv.host, args.port or srv.port, args.workers)
    return EXIT_OK


def _audit_paths(args) -> tuple[Path, Path, Path]:
    """(database, key file, anchor) from the flags, else from ``runtime.audit``."""
    from so8t.runtime.agent import resolve

    params, base = _params(args)
    a = params.runtime.audit
    db = Path(args.db) if args.db else resolve(base, a.db)
    key = Path(args.key_file) if args.key_file else (resolve(base, a.key_file) if a.key_file else db.with_name("audit.key"))
    anchor = Path(args.anchor) if args.anchor else (resolve(base, a.anchor) if a.anchor else db.with_name(db.name + ".anchor"))
    return db, key, anchor


def cmd_audit_verify(args) -> int:
    from so8t.runtime.audit import verify_chain

    db, key_file, anchor = _audit_paths(args)
    if not key_file.is_file():
        raise FileNotFoundError(f"{key_file}: audit key not found (runtime.audit.key_file or --key-file)")
    from so8t.runtime.audit import load_or_create_key

    report = verify_chain(db, load_or_create_key(key_file), None if args.no_anchor else anchor, args.expect_head)
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False, indent=2))
    elif report.ok:
        print(f"OK: {report.path}: {report.rows} rows, chain intact{'' if args.no_anchor else ' and anchored'}; "
              f"head {report.head}")
    else:
        print(f"FAILED: {report.path}: {report.rows} rows, {len(report.findings)} problem(s):")
        for f in report.findings:
            print(f"  row {f.row_id}: {f.kind}: {f.detail}")
    return EXIT_OK if report.ok else EXIT_FINDING


def cmd_audit_keygen(args) -> int:
    from so8t.runtime.audit import load_or_create_key

    _, key_file, _ = _audit_paths(args)
    if key_file.exists():
        raise ValueError(f"{key_file}: exists; an audit key is never overwritten (the log would no longer verify)")
    load_or_create_key(key_file)
    print(key_file)
    return EXIT_OK


def cmd_ollama(args) -> int:
    from so8t.runtime.agent import resolve
    from so8t.runtime.ollama import sampling_parameters, write_modelfiles
    from so8t.runtime.select import served_model

    params, base = _params(args)
    if args.gguf:
        ggufs = [Path(g) for g in args.gguf]
    else:
        served = served_model(params.runtime.model, base, params.runtime.metrics)
        if served.warning:
            warn(served.warning)
        info(served.reason.replace("serving", "recommended:", 1))
        folder = served.path.parent
        ggufs = sorted(folder.glob(GGUF_GLOB))
        if not ggufs:
            raise FileNotFoundError(f"no {GGUF_GLOB} in {folder} (run the quantize stage, or name GGUF files)")
    out = Path(args.out) if args.out else resolve(base, params.runtime.ollama_dir)
    for path in write_modelfiles(ggufs, out, sampling_parameters(params)):
        print(path)
    return EXIT_OK


def cmd_keygen(args) -> int:
    import secrets

    import yaml

    from so8t.access import parse_level
    from so8t.runtime.server import key_digest

    level = parse_level(args.level)
    key = secrets.token_urlsafe(32)
    entry = [{"user": args.user, "access_level": level.ja, "sha256": key_digest(key)}]
    console.print("API key (shown once; give it to the user, keep only the entry below):")
    print(key)
    console.print("entry for runtime.server.api_keys_file:")
    print(yaml.safe_dump(entry, allow_unicode=True, sort_keys=False), end="")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="params file (default: ./params.yaml)")
    who = argparse.ArgumentParser(add_help=False)
    who.add_argument("--user", default=_login(), help="user id for the audit log (default: login name)")
    who.add_argument("--level", default="公開", help="caller's access level: 公開 | 取扱注意 | 機密 | 極秘")
    who.add_argument("--model", help="GGUF file or Hugging Face folder (default: runtime.model)")
    who.add_argument("--json", action="store_true", help="print the answer as JSON")

    parser = argparse.ArgumentParser(
        prog="so8t",
        description="Run the fine-tuned model: decision + final answer, "
        "private reasoning, closed-domain retrieval, audit log.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ask", parents=[common, who], help="answer one question")
    p.add_argument("question")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("chat", parents=[common, who], help="interactive conversation")
    p.add_argument("--history", type=int, default=3, help="earlier exchanges kept in the context (default 3)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", parents=[common], help="OpenAI-compatible HTTP server")
    p.add_argument("--host", help="default: runtime.server.host")
    p.add_argument("--port", type=int, help="default: runtime.server.port")
    p.add_argument("--workers", type=int, default=1, help="server processes, each with its own model (default 1)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("audit", help="audit log tools")
    audit_sub = p.add_subparsers(dest="audit_command", required=True)
    v = audit_sub.add_parser("verify", parents=[common], help="check the keyed chain and its anchor (exit 1 on a problem)")
    v.add_argument("--db", help="audit database (default: runtime.audit.db)")
    v.add_argument("--key-file", help="HMAC key (default: runtime.audit.key_file)")
    v.add_argument("--anchor", help="anchor file (default: runtime.audit.anchor)")
    v.add_argument("--no-anchor", action="store_true", help="check the database alone")
    v.add_argument("--expect-head", help="a row hash recorded earlier that must still be in the log")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_audit_verify)
    k = audit_sub.add_parser("keygen", parents=[common], help="create the audit HMAC key (never overwrites)")
    k.add_argument("--db", help="audit database (default: runtime.audit.db)")
    k.add_argument("--key-file", help="where (default: runtime.audit.key_file)")
    k.add_argument("--anchor", help=argparse.SUPPRESS)
    k.set_defaults(func=cmd_audit_keygen)

    p = sub.add_parser("ollama", parents=[common], help="write an Ollama Modelfile per GGUF")
    p.add_argument("gguf", nargs="*", help=f"GGUF files (default: {GGUF_GLOB} next to runtime.model; auto: models/gguf)")
    p.add_argument("--out", help="output folder (default: runtime.ollama_dir)")
    p.set_defaults(func=cmd_ollama)

    p = sub.add_parser("keygen", help="make an API key and its entry for the keys file")
    p.add_argument("--user", required=True)
    p.add_argument("--level", required=True, help="公開 | 取扱注意 | 機密 | 極秘")
    p.set_defaults(func=cmd_keygen)
    return parser


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "local"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``so8t`` console script; returns the exit code."""
    from so8t.io import DataError
    from so8t.params import ParamsError
    from so8t.runtime.agent import AgentInputError
    from so8t.runtime.model import ModelError
    from so8t.runtime.ollama import OllamaTemplateError
    from so8t.data.retrieval import RetrievalError
    from so8t.runtime.server import ServerConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (
        ParamsError,
        DataError,
        ModelError,
        RetrievalError,
        AgentInputError,
        OllamaTemplateError,
        ServerConfigError,
        FileNotFoundError,
        ValueError,
    ) as e:
        console.print(f"[bold red]so8t {args.command}:[/] {escape(str(e))}", soft_wrap=True, highlight=False)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
