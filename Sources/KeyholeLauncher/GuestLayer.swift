public import KeyholePolicy

/// The per-run initramfs layer appended to the guest's initrd: the guest's configuration
/// and, for the builtin image, its `/init`. It holds placeholders, plain `guest.env`, the
/// network settings and the sandbox CA *certificate*; never a real value or the CA key.
public struct GuestLayer: Sendable {
    public struct Network: Sendable {
        public var address: InterfaceAddress
        public var gateway: IPAddress
        public var resolver: IPAddress

        public init(address: InterfaceAddress, gateway: IPAddress, resolver: IPAddress) {
            self.address = address
            self.gateway = gateway
            self.resolver = resolver
        }
    }

    /// Where the guest finds the bundle and the CA, and the variables that point at them.
    public static let bundlePath = "/etc/ssl/certs/ca-certificates.crt"
    public static let caPath = "/keyhole/ca.pem"
    static let trustVariables = [
        ("SSL_CERT_FILE", bundlePath), ("REQUESTS_CA_BUNDLE", bundlePath), ("CURL_CA_BUNDLE", bundlePath), ("NODE_EXTRA_CA_CERTS", caPath),
    ]
    /// The line the builtin init writes to the serial console when the command ends.
    public static let exitMarker = "KEYHOLE-EXIT "
    /// The line the builtin init writes to the serial console as soon as it runs.
    public static let bootMarker = "KEYHOLE-BOOTED"

    public var environment: [(String, String)]
    public var network: Network
    public var caCertificatePEM: String
    public var command: [String]?
    /// The guest stays up and runs commands sent by the host (`GuestAgentScript`).
    public var agent = false
    public var hostname: String

    /// The guest's environment: each secret's placeholder, the plain `guest.env`, and the
    /// CA trust variables.
    public init(policy: Policy, network: Network, caCertificatePEM: String, command: [String]?) {
        var environment: [(String, String)] = policy.secrets.map { ($0.env, $0.placeholder) }
        environment += (policy.guest?.env ?? []).map { ($0.name, $0.value) }
        environment += Self.trustVariables
        self.environment = environment
        self.network = network
        self.caCertificatePEM = caCertificatePEM
        self.command = command
        hostname = policy.name
    }

    /// `'text'` for a POSIX shell, whatever `text` holds.
    static func quote(_ text: String) -> String {
        "'" + text.replacingOccurrences(of: "'", with: "'\\''") + "'"
    }

    var environmentScript: String {
        environment.map { "export \($0.0)=\(Self.quote($0.1))\n" }.joined()
    }

    var networkScript: String {
        "KH_ADDR=\(network.address)\nKH_GW=\(network.gateway)\nKH_DNS=\(network.resolver)\nKH_HOSTNAME=\(Self.quote(hostname))\n"
    }

    /// The archive; `withInit` adds the builtin image's `/init`.
    public func archive(withInit: Bool) -> [UInt8] {
        var cpio = CpioArchive()
        cpio.directory("keyhole")
        cpio.file("keyhole/env", environmentScript)
        cpio.file("keyhole/net", networkScript)
        cpio.file("keyhole/ca.pem", caCertificatePEM)
        if let command {
            cpio.file("keyhole/command", "exec " + command.map(Self.quote).joined(separator: " ") + "\n")
        }
        if agent { cpio.file(String(GuestAgentScript.path.dropFirst()), GuestAgentScript.source) }
        if withInit { cpio.file("init", Self.initScript, mode: 0o755) }
        return cpio.finish()
    }

    /// PID 1 of the builtin guest: mounts, modules, network, trust, then the command (its
    /// stdout and stderr on two virtio consoles, its status on the serial console), the
    /// command agent (on one virtio console), or a shell on the console; powers off when
    /// that ends.
    static let initScript = """
        #!/bin/busybox sh
        /bin/busybox mkdir -p /usr/bin /sbin /usr/sbin /proc /sys /dev /tmp /run
        /bin/busybox --install -s
        export PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
        mount -t proc proc /proc
        mount -t sysfs sys /sys
        mount -t devtmpfs dev /dev
        mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
        mount -t tmpfs tmp /tmp
        echo KEYHOLE-BOOTED >/dev/ttyS0
        for m in $(cat /lib/modules/keyhole/order); do insmod /lib/modules/keyhole/$m.ko 2>/dev/null; done
        . /keyhole/net
        hostname "$KH_HOSTNAME"
        ip link set lo up
        ip link set eth0 up
        ip addr add "$KH_ADDR" dev eth0
        ip route add default via "$KH_GW"
        echo "nameserver $KH_DNS" > /etc/resolv.conf
        cat /keyhole/ca.pem >> /etc/ssl/certs/ca-certificates.crt
        export HOME=/root TERM=${TERM:-linux}
        . /keyhole/env
        cd /root
        if [ -f /keyhole/command ]; then
          i=0
          while [ ! -e /dev/hvc1 ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
          exec 3>/dev/hvc0 4>/dev/hvc1
          stty -F /dev/hvc0 raw -echo; stty -F /dev/hvc1 raw -echo
          sh /keyhole/command </dev/null >&3 2>&4
          echo "KEYHOLE-EXIT $?" >/dev/ttyS0
        elif [ -f /keyhole/agent.py ]; then
          i=0
          while [ ! -e /dev/hvc0 ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
          stty -F /dev/hvc0 raw -echo
          python3 /keyhole/agent.py /dev/hvc0 </dev/null >/dev/ttyS0 2>&1
          echo "KEYHOLE-EXIT $?" >/dev/ttyS0
        else
          echo "keyhole: sandbox $KH_HOSTNAME is up; exit the shell to stop it"
          setsid cttyhack sh -l
        fi
        sync
        poweroff -f

        """
}
