#!/usr/bin/env bash
# Keeps ha-raft's layers true (docs/architecture.md, "ha-raft's layers"). Fails when
#  - a file names (crate::<module>) a top-level module of a higher layer, or another
#    module of its own layer;
#  - `impl NodeInner` appears outside ha-raft/src/node/;
#  - sled is named outside ha-raft/src/store/ (the log can move to another engine);
#  - the files import each other in a cycle (crate::, super:: and a mod.rs's use of its
#    children, test modules aside).
# Usage: scripts/check-layers.sh [SRC_DIR]    (default: ha-raft/src)
#        scripts/check-layers.sh --self-test  (each rule fails on a planted violation)
set -euo pipefail

# Bottom to top; modules sharing a layer are joined by commas. `proto` is generated.
LAYERS=(error data store net config admin backup replica node server startup client admin_client)

rank_of() {
  local i
  for i in "${!LAYERS[@]}"; do
    case ",${LAYERS[$i]}," in *",$1,"*) echo "$i"; return ;; esac
  done
  echo "-1"
}

# The lines of a file that count: before its test module, without comments.
code_of() {
  awk '/^[[:space:]]*#\[cfg\(test\)\]/ { exit } { sub(/\/\/.*/, ""); print }' "$1"
}

# The file a module path resolves to, walking from directory $2 (whose own module file
# is $3): the deepest existing file among its components.
resolve() {
  local path=$1 dir=$2 target=$3 comp
  IFS=':' read -r -a comps <<<"${path//::/:}"
  for comp in "${comps[@]}"; do
    if [[ -f "$dir/$comp.rs" ]]; then
      target="$dir/$comp.rs"
      dir="$dir/$comp"
    elif [[ -f "$dir/$comp/mod.rs" ]]; then
      target="$dir/$comp/mod.rs"
      dir="$dir/$comp"
    else
      break
    fi
  done
  echo "$target"
}

check() {
  local src=${1%/} failed=0 file rel top own_rank ref module rank edges
  edges=$(mktemp)
  while IFS= read -r file; do
    rel=${file#"$src"/}
    top=${rel%%/*}
    top=${top%.rs}
    own_rank=$(rank_of "$top")
    if [[ $own_rank == -1 ]]; then
      echo "layers: $rel: module '$top' is in no layer (add it to LAYERS in $0)"
      failed=1
      continue
    fi
    if [[ $top != node ]] && code_of "$file" | grep -qE '^[[:space:]]*impl(<[^>]*>)?[[:space:]]+(crate::node::)?NodeInner\b'; then
      echo "layers: $rel: impl NodeInner outside node/"
      failed=1
    fi
    if [[ $top != store ]] && code_of "$file" | grep -qE '\bsled::'; then
      echo "layers: $rel: names sled outside store/"
      failed=1
    fi
    # Upward and sideways imports.
    while IFS= read -r ref; do
      module=${ref#crate::}
      module=${module%%::*}
      [[ $module == proto || $module == "$top" ]] && continue
      rank=$(rank_of "$module")
      if ((rank == -1 || rank >= own_rank)); then
        echo "layers: $rel ($top, layer $own_rank) names $ref ($module, layer $rank)"
        failed=1
      fi
    done < <(code_of "$file" | grep -oE 'crate(::[A-Za-z_][A-Za-z0-9_]*)+' | sort -u)
    # File edges for the cycle check.
    local dir parent_dir parent_file
    dir=$(dirname "$file")
    if [[ $(basename "$file") == mod.rs ]]; then
      parent_dir=$(dirname "$dir")
      own_dir=$dir
    else
      parent_dir=$dir
      own_dir="$dir/$(basename "$file" .rs)"
    fi
    parent_file="$parent_dir/mod.rs"
    [[ -f $parent_file ]] || parent_file="$parent_dir.rs"
    [[ $parent_dir == "$src" ]] && parent_file="$src/lib.rs"
    while IFS= read -r ref; do
      local target
      case $ref in
        crate::*) target=$(resolve "${ref#crate::}" "$src" "$src/lib.rs") ;;
        super::*) target=$(resolve "${ref#super::}" "$parent_dir" "$parent_file") ;;
        *) target=$(resolve "$ref" "$own_dir" "$file") ;;
      esac
      if [[ $target != "$file" && $target != "$src/lib.rs" ]]; then
        echo "${file#"$src"/} ${target#"$src"/}" >>"$edges"
      fi
    done < <(
      code_of "$file" | grep -oE '(crate|super)(::[A-Za-z_][A-Za-z0-9_]*)+' | sort -u
      # A module's own children, named by `use child::` / `child::item`.
      if [[ -d $own_dir ]]; then
        code_of "$file" | grep -oE '(^|[^:A-Za-z0-9_])[a-z_][a-z0-9_]*::[A-Za-z_][A-Za-z0-9_]*' |
          sed -E 's/^[^a-z_]//' | while IFS= read -r child; do
            [[ -f "$own_dir/${child%%::*}.rs" || -f "$own_dir/${child%%::*}/mod.rs" ]] && echo "$child"
          done | sort -u
      fi
    )
  done < <(find "$src" -name '*.rs' ! -path "$src/lib.rs" | sort)
  if ! tsort "$edges" >/dev/null 2>"$edges.err"; then
    echo "layers: files import each other in a cycle:"
    grep -v "input contains a loop" "$edges.err" | sed 's/^tsort: /  /'
    failed=1
  fi
  rm -f "$edges" "$edges.err"
  return $failed
}

self_test() {
  local src=$1 tmp status=0
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  plant() { # $1: name, $2: file, $3: line to append
    rm -rf "$tmp/src" && cp -r "$src" "$tmp/src"
    printf '%s\n' "$3" | cat - "$tmp/src/$2" >"$tmp/f" && mv "$tmp/f" "$tmp/src/$2"
    if check "$tmp/src" >/dev/null; then
      echo "layers self-test: '$1' was not caught"
      status=1
    fi
  }
  check "$src" >/dev/null || { echo "layers self-test: the tree itself fails"; return 1; }
  plant "an upward import" data/command.rs "use crate::node::RaftNode;"
  plant "an import of the layer above" client/mod.rs "use crate::admin_client::RaftAdmin;"
  plant "impl NodeInner outside node/" replica/mod.rs "impl crate::node::NodeInner {}"
  plant "sled outside store/" node/mod.rs "type Tree = sled::Tree;"
  plant "a file cycle" node/routing.rs "use super::keepalive::X; use super::routing::Y;"
  plant "a file cycle through a child" node/mod.rs "use routing::Attempt;"
  [[ $status == 0 ]] && echo "layers self-test: every planted violation was caught"
  return $status
}

cd "$(dirname "$0")/.."
if [[ ${1:-} == --self-test ]]; then
  self_test ha-raft/src
else
  check "${1:-ha-raft/src}" && echo "layers: ha-raft's imports follow its layers"
fi
