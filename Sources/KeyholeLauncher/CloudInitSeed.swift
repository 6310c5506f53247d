import Foundation
import KeyholeNetfilter
import KeyholeProxy

/// A cloud-init NoCloud seed for `guest.disk` guests: the same configuration as the builtin
/// guest's initramfs layer (placeholders, plain env, network, the sandbox CA certificate,
/// the command), as `user-data`, `meta-data` and `network-config` on an ISO 9660 volume
/// labelled `cidata`. Never a real value or the CA key.
public struct CloudInitSeed: Sendable {
    public let layer: GuestLayer
    public let mac: String

    public init(layer: GuestLayer, mac: String) {
        self.layer = layer
        self.mac = mac
    }

    /// YAML double-quoted scalars are JSON strings.
    static func quote(_ text: String) -> String { AuditRecord.quote(text) }

    public var userData: String {
        let profile = layer.environmentScript
        let environment = layer.environment.map { "\($0.0)=\($0.1)\n" }.joined()
        var text = """
            #cloud-config
            hostname: \(Self.quote(layer.hostname))
            write_files:
              - path: /etc/profile.d/keyhole.sh
                permissions: "0644"
                content: \(Self.quote(profile))
              - path: /etc/environment
                append: true
                content: \(Self.quote(environment))
              - path: /keyhole/ca.pem
                permissions: "0644"
                content: \(Self.quote(layer.caCertificatePEM))
            ca_certs:
              trusted:
                - \(Self.quote(layer.caCertificatePEM))

            """
        if let command = layer.command {
            // As in the builtin guest: stdout and stderr on the two virtio consoles, the status
            // on the serial console, then power off.
            let script = ". /etc/profile.d/keyhole.sh; " + command.map(GuestLayer.quote).joined(separator: " ")
                + " </dev/null >/dev/hvc0 2>/dev/hvc1; echo \"\(GuestLayer.exitMarker)$?\" >/dev/ttyS0; poweroff -f"
            text += "runcmd:\n  - [sh, -c, \(Self.quote(script))]\n"
        }
        return text
    }

    public var metaData: String {
        "instance-id: \(Self.quote("keyhole-" + layer.hostname))\nlocal-hostname: \(Self.quote(layer.hostname))\n"
    }

    public var networkConfig: String {
        """
        version: 2
        ethernets:
          keyhole0:
            match:
              macaddress: \(Self.quote(mac))
            addresses: [\(Self.quote(layer.network.address.description))]
            routes:
              - to: default
                via: \(Self.quote(layer.network.gateway.description))
            nameservers:
              addresses: [\(Self.quote(layer.network.resolver.description))]

        """
    }

    /// Writes the seed volume to `path` with genisoimage.
    public func write(to path: String) throws(LauncherError) {
        let directory = path + ".d"
        let fm = FileManager.default
        try? fm.removeItem(atPath: directory)
        defer { try? fm.removeItem(atPath: directory) }
        do {
            try fm.createDirectory(atPath: directory, withIntermediateDirectories: true)
            try userData.write(toFile: directory + "/user-data", atomically: true, encoding: .utf8)
            try metaData.write(toFile: directory + "/meta-data", atomically: true, encoding: .utf8)
            try networkConfig.write(toFile: directory + "/network-config", atomically: true, encoding: .utf8)
        } catch {
            throw .image("cannot write the cloud-init seed files in \(directory): \(error.localizedDescription)")
        }
        guard fm.isExecutableFile(atPath: "/usr/bin/genisoimage") else {
            throw .image("a guest.disk needs a cloud-init seed, written with genisoimage: install Debian's genisoimage package")
        }
        do {
            _ = try HostCommand.run(
                "/usr/bin/genisoimage", ["-quiet", "-output", path, "-volid", "cidata", "-joliet", "-rock", "user-data", "meta-data", "network-config"],
                directory: directory)
        } catch {
            throw .image("cannot write the cloud-init seed \(path): \(error)")
        }
    }
}
