import Foundation
import KeyholeNetfilter

/// `image: builtin`, the embedded default guest: a Debian cloud kernel and an initramfs
/// with busybox, curl, python3 and the CA bundle, assembled from Debian's packages on first
/// use and cached in the state directory (BRIEF §3).
public struct BuiltinImage: Sendable {
    /// Bump when the assembled layout changes, so caches are rebuilt.
    static let layout = 1
    static let kernelPackage = "linux-image-cloud-amd64"
    static let userPackages = ["busybox-static", "curl", "python3.11-minimal", "libpython3.11-stdlib", "ca-certificates"]
    /// Dependencies a booted initramfs has no use for (package tooling, perl, docs).
    static let skipped: Set<String> = [
        "debconf", "cdebconf", "dpkg", "perl", "perl-base", "perl-modules-5.36", "libperl5.36", "install-info", "mailcap",
        "mime-support", "media-types", "libdebian-installer4", "libnewt0.52", "libslang2", "libtextwrap1", "tar",
        "readline-common", "libgdbm-compat4", "libdb5.3", "gcc-12-base", "openssl",
    ]
    /// Kernel modules the guest loads at boot, in dependency order (paths under kernel/).
    static let modules = [
        "drivers/virtio/virtio_ring.ko", "drivers/virtio/virtio.ko", "drivers/virtio/virtio_mmio.ko", "net/core/failover.ko",
        "drivers/net/net_failover.ko", "drivers/net/virtio_net.ko", "drivers/char/virtio_console.ko",
        "drivers/char/hw_random/virtio-rng.ko",
    ]

    public let directory: String

    public init(stateDirectory: String) {
        directory = stateDirectory + "/images/builtin-\(Self.layout)"
    }

    public var kernelPath: String { directory + "/vmlinuz" }
    public var initrdPath: String { directory + "/initrd.cpio" }
    var readyMarker: String { directory + "/ready" }

    public var isReady: Bool { FileManager.default.fileExists(atPath: readyMarker) }

    /// Forgets the cached image (the next `ensure` builds it again).
    public func discard() { try? FileManager.default.removeItem(atPath: directory) }

    /// Builds the image unless the cache has it; `progress` gets one line per step.
    public func ensure(progress: (String) -> Void) throws(LauncherError) {
        if isReady { return }
        let fm = FileManager.default
        let work = directory + ".partial-\(getpid())"
        try? fm.removeItem(atPath: work)
        defer { try? fm.removeItem(atPath: work) }
        do {
            try fm.createDirectory(atPath: work + "/debs", withIntermediateDirectories: true)
            try fm.createDirectory(atPath: work + "/root", withIntermediateDirectories: true)
            try fm.createDirectory(atPath: work + "/kernel", withIntermediateDirectories: true)
        } catch {
            throw .image("cannot create \(work): \(error.localizedDescription)")
        }
        let started = Date()
        progress("[1/5] resolving Debian packages (a cloud kernel, busybox, curl, python3, CA bundle)")
        var packages = try resolve()
        packages.append(try kernelImagePackage())
        progress("[2/5] downloading \(packages.count) Debian packages")
        try step("apt-get download") {
            do {
                _ = try HostCommand.run("/usr/bin/apt-get", ["download", "-q"] + packages, directory: work + "/debs")
            } catch {
                // Stale package lists name versions the mirror no longer has: refresh once.
                progress("      refreshing the package lists (apt-get update) and retrying")
                _ = try HostCommand.run("/usr/bin/apt-get", ["update", "-q"])
                _ = try HostCommand.run("/usr/bin/apt-get", ["download", "-q"] + packages, directory: work + "/debs")
            }
        }
        let debs = ((try? fm.contentsOfDirectory(atPath: work + "/debs")) ?? []).filter { $0.hasSuffix(".deb") }.sorted()
        progress("[3/5] unpacking \(debs.count) packages")
        for (index, deb) in debs.enumerated() {
            let isKernel = deb.hasPrefix("linux-image-")
            try step("dpkg-deb -x \(deb)") {
                _ = try HostCommand.run("/usr/bin/dpkg-deb", ["-x", work + "/debs/" + deb, work + (isKernel ? "/kernel" : "/root")])
            }
            if (index + 1) % 10 == 0 || index + 1 == debs.count { progress("      \(index + 1)/\(debs.count) unpacked") }
        }
        progress("[4/5] arranging the guest: kernel, modules, python3, CA bundle")
        try arrange(work: work)
        progress("[5/5] writing the initramfs")
        try step("cpio") {
            _ = try HostCommand.run("/bin/sh", ["-c", "cd root && find . | LC_ALL=C sort | cpio -o -H newc --quiet > ../initrd.cpio"], directory: work)
        }
        do {
            if fm.fileExists(atPath: directory) { try fm.removeItem(atPath: directory) }
            try fm.createDirectory(atPath: directory, withIntermediateDirectories: true)
            try fm.moveItem(atPath: work + "/vmlinuz", toPath: kernelPath)
            try fm.moveItem(atPath: work + "/initrd.cpio", toPath: initrdPath)
            try (packages.sorted().joined(separator: "\n") + "\n").write(toFile: readyMarker, atomically: true, encoding: .utf8)
        } catch {
            throw .image("cannot store the image in \(directory): \(error.localizedDescription)")
        }
        let size = ((try? fm.attributesOfItem(atPath: initrdPath)[.size] as? Int) ?? 0) / (1 << 20)
        progress(String(format: "      done in %.0f s: %@ (%d MiB initramfs), cached for the next runs", Date().timeIntervalSince(started), directory, size))
    }

    /// The user packages and their dependencies, minus what a booted initramfs never uses.
    func resolve() throws(LauncherError) -> [String] {
        let arguments = ["depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances"]
        func list() -> [String]? {
            guard let output = try? HostCommand.run("/usr/bin/apt-cache", arguments + Self.userPackages) else { return nil }
            let names = output.split(separator: "\n").filter { !$0.hasPrefix(" ") && !$0.hasPrefix("<") }.map(String.init)
            return names.isEmpty ? nil : names
        }
        var names = list()
        if names == nil {
            // A fresh machine may have no package lists yet.
            _ = try? HostCommand.run("/usr/bin/apt-get", ["update", "-q"])
            names = list()
        }
        guard let names else {
            throw .image("apt-cache cannot resolve \(Self.userPackages.joined(separator: ", ")); is a Debian 12 package source configured?")
        }
        return Array(Set(names).subtracting(Self.skipped)).sorted()
    }

    /// The versioned kernel package the metapackage points at (apt-get download does not
    /// follow dependencies).
    func kernelImagePackage() throws(LauncherError) -> String {
        let output = (try? HostCommand.run("/usr/bin/apt-cache", ["depends", Self.kernelPackage])) ?? ""
        for line in output.split(separator: "\n") {
            let fields = line.split(separator: " ")
            if fields.count == 2, fields[0] == "Depends:", fields[1].hasPrefix("linux-image-") { return String(fields[1]) }
        }
        throw .image("apt-cache cannot resolve \(Self.kernelPackage) to a kernel package")
    }

    func arrange(work: String) throws(LauncherError) {
        let fm = FileManager.default
        let root = work + "/root"
        let moduleRoot = (try? fm.contentsOfDirectory(atPath: work + "/kernel/lib/modules"))?.first.map { work + "/kernel/lib/modules/" + $0 + "/kernel/" }
        let kernel = ((try? fm.contentsOfDirectory(atPath: work + "/kernel/boot")) ?? []).first { $0.hasPrefix("vmlinuz-") }
        guard let moduleRoot, let kernel else { throw .image("the kernel package has no vmlinuz or modules") }
        do {
            try fm.moveItem(atPath: work + "/kernel/boot/" + kernel, toPath: work + "/vmlinuz")
            for path in ["usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/lintian", "usr/share/zsh", "usr/share/info"] {
                try? fm.removeItem(atPath: root + "/" + path)
            }
            for path in ["lib/modules/keyhole", "proc", "sys", "dev", "tmp", "run", "root", "sbin", "usr/sbin", "etc/ssl/certs", "keyhole"] {
                try fm.createDirectory(atPath: root + "/" + path, withIntermediateDirectories: true)
            }
            var order: [String] = []
            for module in Self.modules {
                let name = (module as NSString).lastPathComponent
                try fm.copyItem(atPath: moduleRoot + module, toPath: root + "/lib/modules/keyhole/" + name)
                order.append(String(name.dropLast(3)))
            }
            try (order.joined(separator: "\n") + "\n").write(toFile: root + "/lib/modules/keyhole/order", atomically: true, encoding: .utf8)
            try? fm.removeItem(atPath: root + "/usr/bin/python3")
            try fm.createSymbolicLink(atPath: root + "/usr/bin/python3", withDestinationPath: "python3.11")
            // The system CA bundle (update-ca-certificates does not run here); the guest's
            // init appends the sandbox CA to it at boot.
            let mozilla = root + "/usr/share/ca-certificates/mozilla"
            var bundle = ""
            for name in ((try? fm.contentsOfDirectory(atPath: mozilla)) ?? []).sorted() where name.hasSuffix(".crt") {
                bundle += (try String(contentsOfFile: mozilla + "/" + name, encoding: .utf8))
                if !bundle.hasSuffix("\n") { bundle += "\n" }
            }
            try bundle.write(toFile: root + "/etc/ssl/certs/ca-certificates.crt", atomically: true, encoding: .utf8)
            try "root:x:0:0:root:/root:/bin/sh\n".write(toFile: root + "/etc/passwd", atomically: true, encoding: .utf8)
            try "root:x:0:\n".write(toFile: root + "/etc/group", atomically: true, encoding: .utf8)
            try "hosts: files dns\n".write(toFile: root + "/etc/nsswitch.conf", atomically: true, encoding: .utf8)
            try "127.0.0.1 localhost\n".write(toFile: root + "/etc/hosts", atomically: true, encoding: .utf8)
        } catch let error as LauncherError {
            throw error
        } catch {
            throw .image("cannot arrange the guest tree: \(error.localizedDescription)")
        }
    }

    private func step(_ what: String, _ body: () throws -> Void) throws(LauncherError) {
        do {
            try body()
        } catch {
            // The tool's last lines say what went wrong; the rest is its progress.
            let lines = "\(error)".split(separator: "\n")
            throw .image("\(what): " + lines.suffix(4).joined(separator: "\n") + (lines.count > 4 ? " (\(lines.count - 4) more lines)" : ""))
        }
    }
}
