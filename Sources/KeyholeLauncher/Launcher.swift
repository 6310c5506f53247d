import Foundation
import KeyholeNetfilter
public import KeyholePolicy
public import KeyholeProxy
import KeyholeTLS

/// `keyhole run`: one policy file becomes a running guest whose only way out is Keyhole
/// (BRIEF §2, §3). The TAP, the appliance on it, the guest's initrd layer and QEMU are
/// created in that order and undone in the reverse order on every exit path.
public final class Launcher: Sendable {
    public enum Outcome: Sendable, Equatable {
        /// The guest command's exit status (0 for a console session that ended).
        case exited(Int32)
        /// block-and-terminate fired; the reason names the secret and the host.
        case terminated(String)
        /// SIGINT or SIGTERM.
        case interrupted(Int32)
    }

    enum Event: Sendable {
        /// QEMU `pid` ended with `status` (a QEMU ended for a retry reports too: match the pid).
        case qemuExited(pid: Int32, status: Int32)
        case bootDeadline
        /// Time for a guest that auto booted with KVM to have reached its init.
        case kvmBootCheck
        case terminate(String)
        case stop(Int32)
    }

    public let policy: Policy
    public let stateDirectory: String
    public let command: [String]?
    /// Agent mode (the SDK's `Sandbox`): the guest stays up and runs what the host sends
    /// on this Unix socket (`GuestAgentScript`); the launch ends with `stop(signal:)`.
    public let agentSocket: String?
    let audit: AuditLog
    let metrics: ProxyMetrics
    let progress: @Sendable (String) -> Void
    private let events = AsyncStream<Event>.makeStream()

    public init(
        policy: Policy, stateDirectory: String, command: [String]?, agentSocket: String? = nil, audit: AuditLog,
        metrics: ProxyMetrics = ProxyMetrics(), progress: @escaping @Sendable (String) -> Void
    ) {
        self.policy = policy
        self.stateDirectory = stateDirectory
        self.command = command
        self.agentSocket = agentSocket
        self.audit = audit
        self.metrics = metrics
        self.progress = progress
    }

    /// Asks a running launch to stop (from a signal handler's queue).
    public func stop(signal: Int32) { events.continuation.yield(.stop(signal)) }

    /// Where a sandbox's per-run files live (initrd, console log, agent socket, lock).
    public static func runDirectory(stateDirectory: String, sandbox: String) -> String {
        stateDirectory + "/run/" + TapName.forSandbox(sandbox)
    }

    /// The agent socket of a sandbox in agent mode.
    public static func agentSocketPath(stateDirectory: String, sandbox: String) -> String {
        runDirectory(stateDirectory: stateDirectory, sandbox: sandbox) + "/agent.sock"
    }

    public func run() async throws -> Outcome {
        let guest = policy.guest ?? GuestSpec()
        let tapName = TapName.forSandbox(policy.name)
        let runDirectory = Self.runDirectory(stateDirectory: stateDirectory, sandbox: policy.name)
        do {
            // 0700: it holds the guest's initrd, console log and (agent mode) the socket that
            // runs commands in the guest.
            try FileManager.default.createDirectory(atPath: runDirectory, withIntermediateDirectories: true)
        } catch {
            throw LauncherError.busy("cannot create \(runDirectory): \(error.localizedDescription)")
        }
        guard chmod(runDirectory, 0o700) == 0 else {
            throw LauncherError.busy("cannot restrict \(runDirectory) to its owner: \(String(cString: strerror(errno)))")
        }
        let lock = try RunLock(path: runDirectory + "/lock", sandbox: policy.name)
        defer { lock.release() }
        if let agentSocket {
            try? FileManager.default.removeItem(atPath: agentSocket)
        }
        defer { if let agentSocket { try? FileManager.default.removeItem(atPath: agentSocket) } }

        let ca = try SandboxCA.loadOrCreate(stateDirectory: stateDirectory)
        let kernel: String
        let baseInitrd: String?
        let withInit: Bool
        switch guest.image {
        case .builtin:
            let image = BuiltinImage(stateDirectory: stateDirectory)
            if !image.isReady { progress("building the builtin guest image (first use; cached afterwards)") }
            try image.ensure(progress: progress)
            (kernel, baseInitrd, withInit) = (image.kernelPath, image.initrdPath, true)
        case .kernel(let path, let initrd, _):
            (kernel, baseInitrd, withInit) = (path, initrd, false)
        }
        var (accelerator, warning) = try QEMU.choose(guest.accel)
        if let warning { progress(warning) }

        let gateway = try GuestAddressing.gateway(for: policy)
        let address = try GuestAddressing.guest(for: gateway)
        let resolver = try GuestAddressing.resolver(for: policy)
        var guarded = policy
        guarded.network.gateway = gateway

        // The guest's initrd: the base image (or the user's initrd) plus this run's layer.
        var layer = GuestLayer(
            policy: policy, network: .init(address: address, gateway: gateway.address, resolver: resolver),
            caCertificatePEM: try String(contentsOfFile: ca.certificatePath, encoding: .utf8),
            command: agentSocket == nil ? command ?? guest.command : nil)
        layer.agent = agentSocket != nil
        let initrd = runDirectory + "/initrd"
        do {
            var bytes = try baseInitrd.map { try Data(contentsOf: URL(fileURLWithPath: $0)) } ?? Data()
            while bytes.count % 4 != 0 { bytes.append(0) }
            bytes.append(contentsOf: layer.archive(withInit: withInit))
            try bytes.write(to: URL(fileURLWithPath: initrd))
        } catch {
            throw LauncherError.image("cannot write the guest's initrd \(initrd): \(error.localizedDescription)")
        }
        defer { try? FileManager.default.removeItem(atPath: initrd) }

        // A disk guest is configured by cloud-init, from a NoCloud seed next to its disk.
        var disks: [QEMU.Disk] = []
        if case .kernel(_, _, let disk?) = guest.image {
            let seed = runDirectory + "/seed.iso"
            try CloudInitSeed(layer: layer, mac: QEMU.mac(for: policy.name)).write(to: seed)
            disks = [QEMU.Disk(path: disk, readOnly: false), QEMU.Disk(path: seed, readOnly: true)]
        }
        defer { try? FileManager.default.removeItem(atPath: runDirectory + "/seed.iso") }

        let tap = try TapDevice.create(tapName)
        defer { tap.remove() }
        let forwarding = Appliance.enableForwarding()
        defer { Appliance.restore(forwarding) }
        let continuation = events.continuation
        let appliance = try await GuardedInterface.start(
            interface: tap.name, policy: guarded, ca: ca, settings: GuardSettings(proxyPort: 0, queueNumber: Self.queueNumber(for: tap.name), stateDirectory: stateDirectory),
            audit: audit, metrics: metrics, onTerminate: { reason in continuation.yield(.terminate(reason)) })
        progress("sandbox \(policy.name): TAP \(tap.name), guest \(address.address), gateway \(gateway.address), DNS \(resolver), \(accelerator.rawValue)")

        let consoleLog = (command ?? guest.command) == nil && agentSocket == nil ? nil : runDirectory + "/console.log"
        func kernelCommandLine(_ accelerator: QEMU.Accelerator) -> String {
            var cmdline = "console=ttyS0 quiet loglevel=3 panic=-1 tsc=reliable" + (withInit ? " rdinit=/init" : "")
            if accelerator == .tcg, let khz = QEMU.hostTSCkHz() {
                // Under TCG the guest's TSC is the host's; calibrating it against the emulated
                // PIT fails now and then on a busy host, and the kernel then hangs.
                cmdline += " tsc_early_khz=\(khz)"
            }
            if let extra = guest.cmdline { cmdline += " " + extra }
            return cmdline
        }
        var outcome: Outcome
        var attempt = 0
        while true {
            attempt += 1
            if let consoleLog { try? Data().write(to: URL(fileURLWithPath: consoleLog)) }
            let boot = QEMU.Boot(
                accelerator: accelerator, kernel: kernel, initrd: initrd, cmdline: kernelCommandLine(accelerator), memoryMiB: guest.memoryMiB,
                vcpus: guest.vcpus,
                tap: tap.name, mac: QEMU.mac(for: policy.name), disks: disks, consoleLog: consoleLog, agentSocket: agentSocket)
            let started = Date()
            let qemu = try startQEMU(boot)
            let deadline = Task { [events] in
                try await Task.sleep(for: .seconds(Self.bootSeconds))
                events.continuation.yield(.bootDeadline)
            }
            // Some hosts let KVM start a machine but not run a kernel (it hangs in early boot,
            // silently): when auto chose KVM, a guest that has not reached its init in time is
            // booted again with TCG.
            let watchKVM = accelerator == .kvm && guest.accel == .auto && attempt == 1
            let kvmCheck = Task { [events] in
                guard watchKVM else { return }
                try await Task.sleep(for: .seconds(Self.kvmBootSeconds))
                events.continuation.yield(.kvmBootCheck)
            }
            let result = await supervise(qemu, consoleLog: (withInit || !disks.isEmpty) ? consoleLog : nil, bootMarker: withInit)
            deadline.cancel()
            kvmCheck.cancel()
            switch result {
            case .outcome(let final):
                outcome = final
            case .kvmStalled:
                progress("KVM did not bring the guest to its init within \(Self.kvmBootSeconds) s; booting with TCG (software emulation, slower)")
                accelerator = .tcg
                continue
            case .noStatus(let qemuStatus):
                // auto picked KVM, and it fell over at once: boot again with TCG.
                if qemuStatus != 0, accelerator == .kvm, guest.accel == .auto, attempt == 1, Date().timeIntervalSince(started) < 10,
                    !Self.consoleHasOutput(consoleLog)
                {
                    progress("KVM could not boot the guest (QEMU exit \(qemuStatus)); booting with TCG (software emulation, slower)")
                    accelerator = .tcg
                    continue
                }
                report("the guest stopped without reporting its command's status (QEMU exit \(qemuStatus))", console: consoleLog)
                outcome = .exited(qemuStatus > 0 && qemuStatus < 128 ? qemuStatus : 1)
            }
            break
        }
        await appliance.stop()
        return outcome
    }

    enum Supervised {
        case outcome(Outcome)
        /// A command was to run, and QEMU ended without its status (QEMU's own status).
        case noStatus(Int32)
        /// The guest had not reached its init under KVM by `kvmBootSeconds`; QEMU was ended.
        case kvmStalled
    }

    /// Waits for QEMU to end, or ends it on block-and-terminate or a signal.
    private func supervise(_ qemu: ChildProcess, consoleLog: String?, bootMarker: Bool) async -> Supervised {
        for await event in events.stream {
            switch event {
            case .qemuExited(let pid, let status):
                guard pid == qemu.pid else { continue }
                if let consoleLog {
                    guard let exit = Self.exitStatus(inConsole: consoleLog) else { return .noStatus(status) }
                    return .outcome(.exited(exit))
                }
                return .outcome(.exited(status == 0 ? 0 : 1))
            case .kvmBootCheck:
                guard bootMarker, let consoleLog, !Self.console(consoleLog, contains: GuestLayer.bootMarker) else { continue }
                Self.end(qemu)
                return .kvmStalled
            case .bootDeadline:
                guard bootMarker, let consoleLog, !Self.console(consoleLog, contains: GuestLayer.bootMarker) else { continue }
                Self.end(qemu)
                report("the guest did not boot within \(Self.bootSeconds) s", console: consoleLog)
                return .outcome(.exited(1))
            case .terminate(let reason):
                Self.end(qemu)
                return .outcome(.terminated(reason))
            case .stop(let signal):
                Self.end(qemu)
                return .outcome(.interrupted(signal))
            }
        }
        return .outcome(.exited(1))
    }

    private func startQEMU(_ boot: QEMU.Boot) throws -> ChildProcess {
        guard FileManager.default.isExecutableFile(atPath: QEMU.binary) else {
            throw LauncherError.qemu("\(QEMU.binary) not found; install Debian's qemu-system-x86 package")
        }
        // A command's guest reads nothing; a console session gets the terminal.
        let stdin = boot.consoleLog == nil ? 0 : open("/dev/null", O_RDONLY | O_CLOEXEC)
        defer { if stdin != 0 { close(stdin) } }
        let child: ChildProcess
        do {
            child = try ChildProcess(QEMU.binary, QEMU.arguments(boot), stdin: stdin, stdout: 1, stderr: 2)
        } catch {
            throw LauncherError.qemu("cannot start \(QEMU.binary): \(error)")
        }
        let continuation = events.continuation
        let waiter = Thread { continuation.yield(.qemuExited(pid: child.pid, status: child.wait())) }
        waiter.start()
        return child
    }

    /// SIGTERM, then SIGKILL if QEMU has not gone after two seconds.
    static func end(_ qemu: ChildProcess) {
        qemu.signal(SIGTERM)
        let deadline = Date().addingTimeInterval(2)
        while qemu.poll() == nil && Date() < deadline { usleep(20_000) }
        qemu.signal(SIGKILL)
        qemu.wait()
    }

    static func exitStatus(inConsole path: String) -> Int32? {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return nil }
        for line in text.split(whereSeparator: \.isNewline).reversed() {
            if let range = line.range(of: GuestLayer.exitMarker), let status = Int32(line[range.upperBound...].trimmingCharacters(in: .whitespaces)) {
                return status
            }
        }
        return nil
    }

    /// How long the builtin guest may take to reach its init (TCG on a busy host: ~5 s).
    static let bootSeconds = 60
    /// How long a guest that auto booted with KVM may take to reach its init (~1 s where
    /// KVM works) before it is booted again with TCG.
    static let kvmBootSeconds = 10

    static func console(_ path: String, contains marker: String) -> Bool {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return false }
        return text.contains(marker)
    }

    static func consoleHasOutput(_ path: String?) -> Bool {
        guard let path, let attributes = try? FileManager.default.attributesOfItem(atPath: path) else { return false }
        return ((attributes[.size] as? Int) ?? 0) > 0
    }

    /// `message`, where the console log is, and its last lines.
    private func report(_ message: String, console path: String?) {
        progress(message + "; console: " + (path ?? "-"))
        guard let path else { return }
        let text = (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
        for line in text.split(whereSeparator: \.isNewline).suffix(8) { progress("  | " + line) }
    }

    /// A queue number per TAP, so that several sandboxes can run side by side.
    static func queueNumber(for tap: String) -> UInt16 {
        UInt16(20000 + (Int(TapName.hash4(tap), radix: 16)! % 10000))
    }
}

/// One run per sandbox name at a time: the TAP, rules and run directory are named after it.
final class RunLock: Sendable {
    let descriptor: Int32

    init(path: String, sandbox: String) throws {
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw LauncherError.busy("cannot open \(path): \(String(cString: strerror(errno)))") }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            close(fd)
            throw LauncherError.busy("sandbox \(sandbox) is already running (lock \(path)); stop it first or give this policy another name")
        }
        descriptor = fd
    }

    func release() {
        flock(descriptor, LOCK_UN)
        close(descriptor)
    }
}
