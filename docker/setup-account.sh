#!/bin/sh
# Create ACCOUNT with a generated password unless it exists. Also create the
# store and the local CA before the MSA and MTA containers start: both share
# them, and they must not create them at the same time.
#   mailstack-setup-account ACCOUNT CONFIG
# The password is written to PASSWORD_DIR/ACCOUNT.password (mode 0600) on first
# run; PASSWORD_DIR defaults to /data, the volume the store is on.
set -eu
account="$1"
config="$2"
password_file="${PASSWORD_DIR:-/data}/${account}.password"

mailstack tls show --config "$config" >/dev/null
if mailstack user list --json --config "$config" | grep -q "\"address\": \"${account}\""; then
    echo "account ${account} exists"
    exit 0
fi
umask 077
# Letters and digits only, so the password never reads as an option ("-...").
python -c 'import secrets, string; a = string.ascii_letters + string.digits; print("".join(secrets.choice(a) for _ in range(16)))' >"$password_file"
mailstack user add "$account" --password-stdin --config "$config" <"$password_file"
echo "account ${account} created; password in ${password_file}"
