#!/usr/bin/env bash
# Push this repository's committed tree to a Hugging Face Space as one clean snapshot commit.
#
#   scripts/push_space.sh SPACE_GIT_URL [BRANCH]       # BRANCH defaults to main
#   scripts/push_space.sh https://huggingface.co/spaces/<you>/medfinder
#
# - The snapshot is HEAD's tree (uncommitted changes are not pushed), committed on top of whatever the
#   Space already holds (a Space made in the web UI has a first commit), so the push fast-forwards.
# - Every binary file (weights, scans, pictures: any file git sees as binary) and every file over
#   10 MB goes through Git LFS, as Spaces require; nothing else changes. This repository itself keeps
#   plain blobs, so a clone of it needs no LFS server.
# - Authentication is git's: a credential helper, or `huggingface-cli login` with its git credential.
#   The URL is never printed.
# Needs git and git-lfs (Debian: apt-get install git-lfs).
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: scripts/push_space.sh SPACE_GIT_URL [BRANCH]" >&2
  exit 2
fi
remote="$1"
branch="${2:-main}"
command -v git-lfs >/dev/null || { echo "error: git-lfs is not installed (Debian: apt-get install git-lfs)." >&2; exit 2; }
repo="$(git rev-parse --show-toplevel 2>/dev/null)" || { echo "error: run this inside the MedFinder repository." >&2; exit 2; }
if [ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]; then
  echo "warning: uncommitted changes are not pushed; the Space gets HEAD ($(git -C "$repo" rev-parse --short HEAD))." >&2
fi
limit=$((10 * 1024 * 1024))

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git -C "$repo" archive --format=tar HEAD | tar -x -C "$work"
cd "$work"
git init -q -b "$branch"
git lfs install --local >/dev/null
git config user.name "$(git -C "$repo" config user.name || echo MedFinder)"
git config user.email "$(git -C "$repo" config user.email || echo medfinder@localhost)"

# Which files go through LFS: git's own binary test (a NUL byte near the start), or size.
{
  echo "# Written by scripts/push_space.sh: binaries and files over 10 MB travel through Git LFS."
  find . -path ./.git -prune -o -type f -print | sed 's|^\./||' | sort | while IFS= read -r file; do
    size=$(stat -c %s "$file")
    if [ "$size" -gt "$limit" ] || LC_ALL=C grep -qaP '\x00' <(head -c 8000 "$file"); then
      printf '%s filter=lfs diff=lfs merge=lfs -text\n' "$(printf '%s' "$file" | sed 's/ /[[:space:]]/g')"
    fi
  done
} > .gitattributes
git add -A

# On top of the Space's history when it has one, so that the push is a fast-forward.
if git fetch -q --depth=1 "$remote" "$branch" 2>/dev/null; then
  parent=(-p FETCH_HEAD)
else
  parent=()
fi
tree="$(git write-tree)"
commit="$(git commit-tree "$tree" "${parent[@]}" -m "MedFinder snapshot of $(git -C "$repo" rev-parse --short HEAD)")"
git update-ref "refs/heads/$branch" "$commit"

# No plain blob over 10 MB (a Space refuses them).
too_big="$(git ls-tree -r -l "$commit" | awk -v limit="$limit" '$4 != "-" && $4 > limit {print $5}')"
if [ -n "$too_big" ]; then
  echo "error: these files would be plain blobs over 10 MB: $too_big" >&2
  exit 1
fi
git push -q "$remote" "$branch:$branch"
echo "pushed $(git rev-parse --short "$commit") ($(git lfs ls-files | wc -l) files through LFS) to branch $branch"
