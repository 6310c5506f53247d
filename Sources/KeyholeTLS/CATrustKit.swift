/// The guest side of trusting the sandbox CA: a POSIX sh script that installs the CA into
/// the system store (Debian/Ubuntu, Alpine, RHEL/Fedora layouts) and points runtimes that
/// carry their own bundles at it (Python requests/httpx, curl, Node, gRPC, Java).
/// `keyhole ca install-script` prints it; run it as root in the guest.
public enum CATrustKit {
    /// Where the script puts the CA certificate alone (Node's `NODE_EXTRA_CA_CERTS`).
    public static let guestCAPath = "/etc/keyhole/sandbox-ca.pem"

    public static func installScript(certificatePEM pem: String) -> String {
        let body = pem.hasSuffix("\n") ? pem : pem + "\n"
        return #"""
            #!/bin/sh
            # Keyhole sandbox CA trust kit: installs the sandbox CA that Keyhole forges guest-facing
            # certificates with, in the system trust store and for runtimes with their own bundles.
            # Run as root in the guest. Idempotent: running it again replaces what it wrote before.
            set -eu
            [ "$(id -u)" = 0 ] || { echo "keyhole-ca: run as root" >&2; exit 1; }
            ca=\#(guestCAPath)
            mkdir -p /etc/keyhole
            cat > "$ca" <<'KEYHOLE_CA_PEM'
            \#(body)KEYHOLE_CA_PEM
            chmod 0644 "$ca"

            # 1. The system store.
            bundle=""
            if [ -d /etc/pki/ca-trust/source/anchors ] && command -v update-ca-trust >/dev/null 2>&1; then
              cp "$ca" /etc/pki/ca-trust/source/anchors/keyhole-sandbox-ca.pem       # RHEL, Fedora, CentOS
              update-ca-trust extract
              bundle=/etc/pki/tls/certs/ca-bundle.crt
            elif command -v update-ca-certificates >/dev/null 2>&1; then
              mkdir -p /usr/local/share/ca-certificates
              cp "$ca" /usr/local/share/ca-certificates/keyhole-sandbox-ca.crt      # Debian, Ubuntu, Alpine
              update-ca-certificates >/dev/null 2>&1 || update-ca-certificates
              bundle=/etc/ssl/certs/ca-certificates.crt
            else
              # No tool: append to the first bundle found (once).
              for b in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt /etc/ssl/cert.pem; do
                if [ -f "$b" ]; then bundle=$b; break; fi
              done
              if [ -z "$bundle" ]; then bundle=/etc/ssl/certs/ca-certificates.crt; mkdir -p /etc/ssl/certs; : > "$bundle"; fi
              grep -q "$(sed -n 2p "$ca")" "$bundle" || cat "$ca" >> "$bundle"
            fi

            # 2. Runtimes with their own bundles: the system bundle (which now holds the CA), or
            #    the CA alone where the runtime adds it to its own (Node).
            vars="SSL_CERT_FILE=$bundle
            REQUESTS_CA_BUNDLE=$bundle
            CURL_CA_BUNDLE=$bundle
            GRPC_DEFAULT_SSL_ROOTS_FILE_PATH=$bundle
            NODE_EXTRA_CA_CERTS=$ca"
            if [ -f /etc/environment ]; then
              grep -v -E '^(SSL_CERT_FILE|REQUESTS_CA_BUNDLE|CURL_CA_BUNDLE|GRPC_DEFAULT_SSL_ROOTS_FILE_PATH|NODE_EXTRA_CA_CERTS)=' /etc/environment > /etc/environment.keyhole || true
              mv /etc/environment.keyhole /etc/environment
            fi
            printf '%s\n' "$vars" >> /etc/environment
            mkdir -p /etc/profile.d
            printf '%s\n' "# written by the Keyhole CA trust kit" > /etc/profile.d/keyhole-ca.sh
            printf '%s\n' "$vars" | sed 's/^/export /' >> /etc/profile.d/keyhole-ca.sh

            # 3. Java (its own keystore), when a JDK is there.
            if command -v keytool >/dev/null 2>&1; then
              keytool -delete -cacerts -storepass changeit -alias keyhole-sandbox-ca >/dev/null 2>&1 || true
              keytool -importcert -noprompt -cacerts -storepass changeit -alias keyhole-sandbox-ca -file "$ca" >/dev/null
            fi

            echo "keyhole-ca: installed $ca in the system store ($bundle)"
            echo "keyhole-ca: runtimes: /etc/environment and /etc/profile.d/keyhole-ca.sh (new logins; this shell: . /etc/profile.d/keyhole-ca.sh)"
            """#
    }
}
