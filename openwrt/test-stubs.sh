# Stand-ins for the parts of OpenWrt's /lib/functions.sh and procd.sh that
# files/outpost.init uses; sourced by test-init.sh. POSIX sh.

# Tiny UCI reader: `config TYPE 'NAME'` and `option KEY 'VALUE'` lines only.
config_load() {
	SECTIONS=""
	while read -r kw a b; do
		a=$(echo "$a" | tr -d "'\""); b=$(echo "$b" | tr -d "'\"")
		case $kw in
		config) sect=$b; SECTIONS="$SECTIONS $a:$b" ;;
		option) eval "CONFIG_${sect}_$a=\$b" ;;
		esac
	done <"$UCI_FILE"
}
config_get() { eval "v=\${CONFIG_$2_$3-}"; [ -n "$v" ] || v="${4-}"; eval "$1=\$v"; }
config_get_bool() {
	config_get "$@"
	eval "case \$$1 in 1|on|true|yes|enabled) $1=1 ;; *) $1=0 ;; esac"
}
config_foreach() {
	for st in $SECTIONS; do [ "${st%%:*}" = "$2" ] && "$1" "${st#*:}"; done
	return 0
}
procd_open_instance() { CMD=""; }
procd_set_param() { [ "$1" = command ] && { shift; CMD="$*"; }; return 0; }
procd_append_param() { [ "$1" = command ] && { shift; CMD="$CMD $*"; }; return 0; }
procd_close_instance() { echo "$CMD"; }
# No side effects on the test machine.
mkdir() { :; }
chmod() { :; }
