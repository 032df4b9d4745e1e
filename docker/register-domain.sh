#!/bin/sh
# Publish one mail domain in the Blue Book, or update it when it exists, so that
# the setup service can run again on every `docker compose up`.
#   mailstack-register-domain CONFIG DOMAIN MX_HOST MTA_ADDRESS MSA_HOST MSA_ADDRESS
# MX_HOST gets MTA_ADDRESS, the SRV records of submission and IMAP (RFC 6186)
# name MSA_HOST, which gets MSA_ADDRESS: the MSA runs in a container of its own.
set -eu
config="$1"
domain="$2"
mx_host="$3"
mta_address="$4"
msa_host="$5"
msa_address="$6"

if mailstack bluebook show "$domain" --config "$config" >/dev/null 2>&1; then
    verb=update
else
    verb=add
fi
mailstack bluebook "$verb" "$domain" --mx "$mx_host" --address "$mta_address" \
    --srv-target "$msa_host" --config "$config" >/dev/null
mailstack bluebook record add "$msa_host" A "$msa_address" --config "$config"
echo "zone ${domain}: ${verb} done (MX ${mx_host} ${mta_address}, MSA ${msa_host} ${msa_address})"
