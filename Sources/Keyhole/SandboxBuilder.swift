import Foundation
public import KeyholePolicy

/// The guest a sandbox boots.
public enum SandboxImage: Sendable, Hashable {
    /// Keyhole's own small guest (Linux, busybox, curl, python3), assembled from Debian's
    /// packages on first use and cached in the state directory. The only image whose
    /// sandboxes can `run` commands (it carries the command agent).
    case builtin
    /// Your kernel (and initrd), booted directly; your init runs.
    case kernel(String, initrd: String? = nil)
    /// Your kernel with a root disk (raw or qcow2), configured by cloud-init.
    case disk(String, kernel: String, initrd: String? = nil)
}

/// Where a sandbox's or appliance's audit events are written, besides `auditEvents`.
public enum AuditDestination: Sendable, Hashable {
    /// JSON lines on standard error (as `keyhole run` does). The default.
    case standardError
    /// JSON lines appended to this file (created 0600).
    case file(String)
    /// Nowhere: the events reach only `auditEvents`.
    case none
}

/// Builds a sandbox: a guest VM whose only way out is Keyhole, with secrets it sees only as
/// placeholders. Every setter returns the same builder.
///
/// ```swift
/// let sandbox = try await Sandbox.builder("worker")
///     .secret { $0.env("GITHUB_TOKEN").value(token).allowHost("api.github.com").allowHostPattern("*.githubusercontent.com") }
///     .secretEnv("SERVICE_API_KEY", value: serviceKey, allowedHost: "api.example.com")
///     .network { $0.onSecretViolation(.blockAndLog) }
///     .create()
/// let result = try await sandbox.run(["sh", "-c", "curl -sS -H \"Authorization: Bearer $GITHUB_TOKEN\" https://api.github.com/user"])
/// try await sandbox.stop()
/// ```
///
/// `create()` checks the whole configuration with the policy file's rules and messages.
public final class SandboxBuilder: NetworkConfigurable {
    let name: String
    var image: SandboxImage = .builtin
    /// An image given by name that is not `builtin`: refused by `policy()` with the file's message.
    var imageName: String?
    var memoryMiB: Int?
    var vcpus: Int?
    var accelerator: String?
    var environment: [(String, String)] = []
    public var networkSettings = NetworkSettings()
    var stateDirectory: String?
    var audit: AuditDestination = .standardError
    var progress: (@Sendable (String) -> Void)?

    init(name: String) { self.name = name }

    /// The guest image. Default `.builtin`.
    @discardableResult public func image(_ image: SandboxImage) -> SandboxBuilder {
        self.image = image
        imageName = nil
        return self
    }
    /// An image by name, as the reference pages write it; this build has `"builtin"` (for
    /// your own guest, use `.kernel` or `.disk`).
    @discardableResult public func image(_ name: String) -> SandboxBuilder {
        image = .builtin
        imageName = name == "builtin" ? nil : name
        return self
    }
    /// Guest memory in MiB (64 … 1048576). Default 512.
    @discardableResult public func memory(mib: Int) -> SandboxBuilder { memoryMiB = mib; return self }
    /// Guest vCPUs (1 … 256). Default 1.
    @discardableResult public func vcpus(_ count: Int) -> SandboxBuilder { vcpus = count; return self }
    /// `auto` (default: KVM where it boots a guest, TCG otherwise), `kvm` or `tcg`.
    @discardableResult public func accelerator(_ name: String) -> SandboxBuilder { accelerator = name; return self }
    /// A plain (non-secret) guest environment variable.
    @discardableResult public func env(_ name: String, _ value: String) -> SandboxBuilder { environment.append((name, value)); return self }







    /// Where the sandbox CA and the builtin image live. Default `$KEYHOLE_STATE_DIR`, else
    /// `/var/lib/keyhole`.
    @discardableResult public func stateDirectory(_ path: String) -> SandboxBuilder { stateDirectory = path; return self }
    /// Where audit events are written besides `Sandbox.auditEvents`. Default standard error.
    @discardableResult public func auditLog(_ destination: AuditDestination) -> SandboxBuilder { audit = destination; return self }
    /// Progress lines while the sandbox starts (image build, addresses, accelerator).
    @discardableResult public func onProgress(_ handler: @escaping @Sendable (String) -> Void) -> SandboxBuilder {
        progress = handler
        return self
    }

    /// Boots the sandbox: TAP, the Keyhole appliance on it, then the guest. Returns once the
    /// guest is ready to run commands. Needs root (TAP, netfilter) and QEMU.
    public func create() async throws -> Sandbox {
        try await Sandbox.start(
            policy: try policy(), image: image, stateDirectory: stateDirectory ?? StateDirectory.resolved(), audit: audit,
            progress: progress)
    }

    /// The policy this builder describes, checked with the policy file's rules.
    public func policy() throws(SandboxError) -> Policy {
        var guest: [(key: String, value: PolicyDocument)] = []
        switch image {
        case .builtin: guest.append(("image", .string(imageName ?? "builtin")))
        case .kernel(let kernel, let initrd):
            guest.append(("kernel", .string(kernel)))
            if let initrd { guest.append(("initrd", .string(initrd))) }
        case .disk(let disk, let kernel, let initrd):
            guest.append(("kernel", .string(kernel)))
            if let initrd { guest.append(("initrd", .string(initrd))) }
            guest.append(("disk", .string(disk)))
        }
        if let memoryMiB { guest.append(("memory_mib", .int(memoryMiB))) }
        if let vcpus { guest.append(("vcpus", .int(vcpus))) }
        if let accelerator { guest.append(("accel", .string(accelerator))) }
        if !environment.isEmpty { guest.append(("env", .map(environment.map { ($0.0, .string($0.1)) }))) }
        return try Sandbox.validate(
            [("name", .string(name)), ("secrets", .list(networkSettings.secrets.map(\.document))), ("network", networkSettings.document), ("guest", .map(guest))],
            origin: "sandbox '\(name)'")
    }
}

extension Sandbox {
    /// A `PolicyDocument` through the policy file's checks; problems as `SandboxError`.
    static func validate(_ entries: [(key: String, value: PolicyDocument)], origin: String) throws(SandboxError) -> Policy {
        do {
            return try PolicyLoader().load(
                document: .map([("version", .int(1))] + entries), origin: origin, baseDirectory: FileManager.default.currentDirectoryPath)
        } catch {
            throw .invalidConfiguration(error.diagnostics.map(\.message))
        }
    }
}

/// The state directory's default, as the command line has it.
enum StateDirectory {
    static func resolved() -> String {
        ProcessInfo.processInfo.environment["KEYHOLE_STATE_DIR"].flatMap { $0.isEmpty ? nil : $0 } ?? "/var/lib/keyhole"
    }
}
