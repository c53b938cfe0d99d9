package pkcs11

import (
	"errors"
	"fmt"
	"sync"
	"time"

	p11 "github.com/miekg/pkcs11"

	"github.com/kubekms/kubekms/internal/safefile"
)

// A PKCS#11 module is process-wide state: C_Initialize and C_Finalize act on
// the whole process, and login is shared by all sessions of a token. Two
// services opening the same module must therefore share one handle, or the
// first Close would finalize the other's sessions. This registry is the one
// piece of package-level state, and it only mirrors what the C library
// already holds globally.
var modules = struct {
	sync.Mutex
	m map[string]*module
}{m: map[string]*module{}}

// reinitInterval rate-limits C_Finalize/C_Initialize cycles while a token
// stays absent.
const reinitInterval = time.Second

// module is one loaded, initialized PKCS#11 library.
//
// Every PKCS#11 call runs under mu.RLock; reinit takes mu.Lock, so no call is
// ever in flight while the library is finalized. gen counts initializations:
// session and object handles from an older generation are dead and must not
// be passed to the library again (the numbers may be reused).
type module struct {
	path string
	ctx  *p11.Ctx

	mu         sync.RWMutex
	gen        uint64
	lastReinit time.Time
	destroyed  bool // released and unloaded; a late reinit must not touch it

	refs int // guarded by modules.Mutex
}

var moduleRules = safefile.Rules{What: "PKCS#11 module", GroupRead: true, OtherRead: true}

func acquireModule(path string) (*module, error) {
	modules.Lock()
	defer modules.Unlock()
	if m, ok := modules.m[path]; ok {
		m.refs++
		return m, nil
	}
	// The module is code this process runs: nobody but its owner (this
	// user or root) may be able to change it or its folder.
	if _, err := safefile.Check(path, moduleRules); err != nil {
		return nil, fmt.Errorf("PKCS#11 module: %w", err)
	}
	ctx := p11.New(path)
	if ctx == nil {
		return nil, fmt.Errorf("PKCS#11 module %s: cannot load it (dlopen failed or it exports no C_GetFunctionList)", path)
	}
	if err := ctx.Initialize(); err != nil && !errors.Is(err, p11.Error(p11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		ctx.Destroy()
		return nil, fmt.Errorf("PKCS#11 module %s: C_Initialize: %w", path, err)
	}
	m := &module{path: path, ctx: ctx, gen: 1, refs: 1}
	modules.m[path] = m
	return m, nil
}

func (m *module) release() {
	modules.Lock()
	defer modules.Unlock()
	m.refs--
	if m.refs > 0 {
		return
	}
	delete(modules.m, m.path)
	m.mu.Lock()
	defer m.mu.Unlock()
	_ = m.ctx.Finalize()
	m.ctx.Destroy()
	m.gen++
	m.destroyed = true
}

// generation returns the current generation. Call it under mu.RLock.
func (m *module) generation() uint64 { return m.gen }

// reinit finalizes and re-initializes the library, unless someone else did so
// since generation seen, or the last cycle was less than reinitInterval ago.
// It is the only way to make a module that does not support token hot-plug
// (SoftHSM2 marks a token whose directory vanished as invalid forever) see a
// token again. It invalidates every session of every service sharing the
// module; they notice by the generation and reopen theirs.
func (m *module) reinit(seen uint64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.destroyed || m.gen != seen || time.Since(m.lastReinit) < reinitInterval {
		return nil
	}
	m.lastReinit = time.Now()
	m.gen++
	_ = m.ctx.Finalize()
	if err := m.ctx.Initialize(); err != nil && !errors.Is(err, p11.Error(p11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		return fmt.Errorf("re-initialize PKCS#11 module %s: %w", m.path, err)
	}
	return nil
}
