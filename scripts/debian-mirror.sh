#!/usr/bin/env bash
# Prints the Debian archive URI this machine's apt is configured with, for debootstrap:
# the first `deb` source (one-line sources.list format, or deb822 *.sources) whose suites
# include SUITE, else the first for any release suite (a suite without a `-security` or
# `-updates` style suffix). The files are the ones apt itself reads (Dir::Etc::sourcelist
# and Dir::Etc::sourceparts, as `apt-config` reports them; APT_CONFIG is honoured).
# No host is built in: with no usable source it fails and says what to add.
# Usage: scripts/debian-mirror.sh [SUITE]   (default bookworm)
set -euo pipefail

suite="${1:-bookworm}"
command -v apt-config >/dev/null || { echo "debian-mirror: apt-config not found (not a Debian machine?)" >&2; exit 1; }
eval "$(apt-config shell SOURCELIST Dir::Etc::sourcelist/f SOURCEPARTS Dir::Etc::sourceparts/d)"
SOURCEPARTS="${SOURCEPARTS%/}"

# "URI SUITE" for every enabled deb source, in the order apt reads the files.
sources() {
  local f
  for f in "$SOURCELIST" "$SOURCEPARTS"/*.list; do
    [ -f "$f" ] || continue
    awk '{ sub(/#.*/, "") } $1 == "deb" {
      i = 2
      if ($i ~ /^\[/) { while ($i !~ /\]$/ && i < NF) i++; i++ }   # [ options ]
      if (i + 1 <= NF) print $i, $(i + 1)
    }' "$f"
  done
  for f in "$SOURCEPARTS"/*.sources; do
    [ -f "$f" ] || continue
    awk 'BEGIN { RS = ""; FS = "\n" } {
      types = ""; uris = ""; suites = ""; enabled = "yes"; key = ""
      for (l = 1; l <= NF; l++) {
        line = $l
        if (line ~ /^#/) continue
        if (line ~ /^[ \t]/) { v = line }                          # a continuation line
        else { key = tolower(line); sub(/:.*/, "", key); v = line; sub(/^[^:]*:/, "", v) }
        if (key == "types") types = types " " v
        else if (key == "uris") uris = uris " " v
        else if (key == "suites") suites = suites " " v
        else if (key == "enabled") enabled = v
      }
      gsub(/[ \t]/, "", enabled)
      if (tolower(enabled) == "no" || (" " types " ") !~ /[ \t]deb[ \t]/) next
      nu = split(uris, u, /[ \t]+/); ns = split(suites, s, /[ \t]+/)
      for (a = 1; a <= nu; a++) if (u[a] != "") for (b = 1; b <= ns; b++) if (s[b] != "") print u[a], s[b]
    }' "$f"
  done
}

all=$(sources | awk '$1 ~ /^(https?|ftp|file):/')
mirror=$(awk -v suite="$suite" '$2 == suite { print $1; exit }' <<<"$all")
[ -n "$mirror" ] || mirror=$(awk '$2 !~ /[-\/]/ { print $1; exit }' <<<"$all")
if [ -z "$mirror" ]; then
  echo "debian-mirror: apt has no Debian archive configured ($SOURCELIST, $SOURCEPARTS/*.list, *.sources):" >&2
  echo "add one, e.g. a deb822 file $SOURCEPARTS/debian.sources with 'Types: deb', 'URIs: <your mirror>', 'Suites: $suite', 'Components: main'" >&2
  exit 1
fi
echo "${mirror%/}"
