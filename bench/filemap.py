"""README's file map: where each step of the paper starts in the modules, printed as a markdown table.

    python bench/filemap.py        # paste between README's "file map" markers
"""
import re, sys
root = sys.argv[1] if len(sys.argv) > 1 else str(__import__("pathlib").Path(__file__).resolve().parent.parent)
def line(f, pat):
    for i, l in enumerate(open(f"{root}/{f}"), 1):
        if re.match(pat, l):
            return i
    raise SystemExit(f"{f}: {pat} not found")
rows = [
 ("router.py", "semantic router (Sec. 3.2)", [
   ("templates: `mask`, `mask_many`", r"def mask\("), ("`tokenize`, `TfidfEmbedder`", r"def tokenize"),
   ("`session_vectors`", r"def session_vectors"), ("`template_scores`, `route`", r"def template_scores")]),
 ("metamodel.py", "small model + system-agnostic meta-learning (Sec. 3.3)", [
   ("input: `Reference`, `structural_features`, `session_features`", r"class Reference"),
   ("the MLP: `init_params`, `forward`, `loss_and_grads`", r"def init_params"), ("`Adam`", r"class Adam"),
   ("tasks: `pseudo_domains`, `support_query`", r"def pseudo_domains"), ("`maml_train`", r"def maml_train"),
   ("`fine_tune`", r"def fine_tune"), ("plumbing: `save`, `load`", r"def save")]),
 ("distill.py", "proprietary branch: LLM ↔ small model distillation with RAG (Sec. 3.4)", [
   ("`DistillConfig`", r"class DistillConfig"), ("whom to ask: `routine_groups`, `whom_to_ask`, `diverse_first`",
                                    r"def routine_groups"),
   ("RAG prompts: `build_messages`, `retrieve`, `prompts`", r"def format_session"),
   ("pseudo-label fusion: `fuse`", r"def fuse\("), ("the loop: `distill`", r"def distill\("),
   ("plumbing: `parse_answer`, `AnswerCache`, `ChatClient`, `ask_all`", r"# ---- plumbing")]),
 ("fusionlog.py", "the whole method (Fig. 2), then reading logs and the CLI", [
   ("`FusionLogConfig`", r"class FusionLogConfig"), ("`FusionLog.fit`: the five steps", r"    def fit\("),
   ("fusion of the two branches: `fuse_branches`", r"    def fuse_branches"),
   ("`predict` (per session)", r"    def predict\("),
   ("plumbing: `SessionReader`, `stream_sessions`, `read_system`, labels", r"# Reading logs"),
   ("the CLI: `main`", r"# Command line"), ("the local teacher: `fusionlog llm`", r"# The local teacher")]),
]
print("| file | paper step | where each part starts (line) |\n|---|---|---|")
for f, step, parts in rows:
    print(f"| `{f}` | {step} | " + "; ".join(f"{name}: {line(f, pat)}" for name, pat in parts) + " |")
