;;; rlm.el --- Ask a Recursive Language Model daemon about large texts  -*- lexical-binding: t; -*-

;; Copyright (C) 2026 The rlmd authors

;; Author: The rlmd authors
;; Maintainer: The rlmd authors
;; Version: 0.1.0
;; Package-Requires: ((emacs "28.1"))
;; Keywords: tools, convenience, text
;; URL: https://github.com/rlmd/rlmd

;; This file is not part of GNU Emacs.

;; This program is free software; you can redistribute it and/or modify
;; it under the terms of the GNU General Public License as published by
;; the Free Software Foundation, either version 3 of the License, or
;; (at your option) any later version.

;; This program is distributed in the hope that it will be useful,
;; but WITHOUT ANY WARRANTY; without even the implied warranty of
;; MERCHANTABILITY or FITNESS FOR A PARTICULAR PURPOSE.  See the
;; GNU General Public License for more details.

;; You should have received a copy of the GNU General Public License
;; along with this program.  If not, see <https://www.gnu.org/licenses/>.

;;; Commentary:

;; A front end for rlmd, a daemon that answers questions about texts far
;; larger than a model's context window: a root model writes Python code
;; that probes the text, and calls sub-models on pieces of it (Recursive
;; Language Models).  Emacs talks JSON-RPC to the daemon over its Unix
;; socket with the built-in jsonrpc.el.
;;
;; Commands:
;;
;;   `rlm-query'          ask about the region, the Org subtree or the buffer
;;   `rlm-query-buffer'   ask about the whole buffer
;;   `rlm-query-region'   ask about the region
;;   `rlm-query-subtree'  ask about the current Org subtree
;;   `rlm-query-files'    ask about files or a directory (read by the daemon)
;;   `rlm-query-context'  ask about a context the daemon already holds
;;   `rlm-review-diff'    review the diff in a `diff-mode' buffer
;;   `rlm-contexts'       list, peek at, search and drop the daemon's contexts
;;   `rlm-cancel'         cancel a running query
;;   `rlm-status'         show the daemon and its pool of model servers
;;   `rlm-trace'          show the trajectory of a query
;;
;; Each query gets its own result buffer.  The model's work streams into a
;; folded trajectory section while the header line shows what is going on;
;; the answer is inserted above it when it arrives.  Point never moves and
;; \\[rlm-cancel] (also C-g or C-c C-k in the result buffer) always stops
;; the query.  Buffers are sent once per modification: asking twice about
;; an unchanged buffer reuses the context the daemon already holds.
;;
;; See docs/emacs.md in the rlmd repository for the whole manual.

;;; Code:

(require 'cl-lib)
(require 'jsonrpc)
(require 'subr-x)
(require 'button)
(require 'tabulated-list)
(require 'outline)
(require 'parse-time)

(declare-function org-back-to-heading "org" (&optional invisible-ok))
(declare-function org-end-of-subtree "org" (&optional invisible-ok to-heading))
(declare-function org-before-first-heading-p "org" ())
(declare-function org-get-heading "org" (&optional no-tags no-todo no-priority no-comment))
(declare-function dired-get-marked-files "dired"
                  (&optional localp arg filter distinguish-one-marked error))
(declare-function project-root "project" (project))

;;;; Customization

(defgroup rlm nil
  "Ask a Recursive Language Model daemon (rlmd) about large texts."
  :group 'tools
  :prefix "rlm-"
  :link '(url-link :tag "Home page" "https://github.com/rlmd/rlmd"))

(defcustom rlm-socket-path nil
  "Unix socket of the rlm daemon.
nil means the daemon's own default, as computed by
`rlm-default-socket-path': $RLMD_SOCKET, else
$XDG_RUNTIME_DIR/rlmd/rlmd.sock, else /run/user/UID/rlmd/rlmd.sock,
else TMPDIR/runtime-UID/rlmd/rlmd.sock."
  :type '(choice (const :tag "The daemon's default" nil) file)
  :group 'rlm)

(defcustom rlm-daemon-command '("rlmd")
  "Command (a program and its arguments) that starts the daemon.
It runs when no daemon answers on the socket; \"--socket PATH\" is
appended.  nil means never start one."
  :type '(choice (const :tag "Never start the daemon" nil)
                 (repeat string))
  :group 'rlm)

(defcustom rlm-daemon-start-timeout 15
  "Seconds to wait for a daemon started by Emacs to answer."
  :type 'number
  :group 'rlm)

(defcustom rlm-request-timeout 30
  "Seconds to wait for short requests (status, contexts, cancel)."
  :type 'number
  :group 'rlm)

(defcustom rlm-put-timeout 300
  "Seconds to wait while the daemon stores a context (text or files)."
  :type 'number
  :group 'rlm)

(defcustom rlm-query-options nil
  "Default options of every query, a plist of the daemon's option names.
For example (:max_iterations 20 :max_depth 1 :timeout_s 600).
Per-call options override these."
  :type '(plist :key-type symbol :value-type sexp)
  :group 'rlm)

(defcustom rlm-display-buffer-action
  '((display-buffer-reuse-window display-buffer-pop-up-window)
    (inhibit-same-window . t))
  "Action used by `display-buffer' to show a result buffer."
  :type 'sexp
  :group 'rlm)

(defcustom rlm-show-trajectory-while-running t
  "Non-nil means the trajectory is expanded while the query runs.
It is folded when the answer arrives, unless you toggled it meanwhile."
  :type 'boolean
  :group 'rlm)

(defcustom rlm-peek-chars 8000
  "Number of characters `rlm-contexts' shows when peeking at a context."
  :type 'integer
  :group 'rlm)

(defcustom rlm-file-transfer-threshold (* 1024 1024)
  "Texts of at least this many characters go to the daemon via a file.
Emacs writes them to a private temporary file that the daemon reads
\(much faster than sending them over the socket), then deletes it.
When the daemon cannot read the file (another machine or a private
/tmp), the text goes over the socket.  nil means always the socket."
  :type '(choice (const :tag "Always over the socket" nil) integer)
  :group 'rlm)

(defcustom rlm-events-buffer-size 0
  "Size of the jsonrpc events log buffer; 0 disables it.
Logging pretty-prints every message, contexts included, so keep it
small unless you debug the protocol."
  :type '(choice (const :tag "Unlimited" nil) integer)
  :group 'rlm)

(defcustom rlm-review-question
  "Review this diff as a careful senior engineer.  List bugs, risky \
changes, unclear code and missing tests, most important first.  Cite \
every finding as path:line, using the new file's line numbers from the \
hunk headers.  Be concise."
  "Question asked by `rlm-review-diff' and `rlm-magit-review'."
  :type 'string
  :group 'rlm)

(defcustom rlm-query-finished-functions nil
  "Functions called when a query ends with an answer.
Each is called with two arguments: the answer (a string) and the
result buffer."
  :type 'hook
  :group 'rlm)

(defface rlm-heading '((t :inherit bold))
  "Face of headings in result buffers."
  :group 'rlm)

(defface rlm-label '((t :inherit font-lock-keyword-face))
  "Face of labels (Question, Context) in result buffers."
  :group 'rlm)

(defface rlm-root-text '((t :inherit shadow))
  "Face of the root model's streamed output in the trajectory."
  :group 'rlm)

(defface rlm-code '((t :inherit font-lock-constant-face))
  "Face of code blocks run in the trajectory."
  :group 'rlm)

(defface rlm-output '((t :inherit font-lock-string-face))
  "Face of code output in the trajectory."
  :group 'rlm)

(defface rlm-subcall '((t :inherit font-lock-function-name-face))
  "Face of sub-call lines in the trajectory."
  :group 'rlm)

(defface rlm-error '((t :inherit error))
  "Face of errors in result buffers."
  :group 'rlm)

;;;; Errors and small helpers

(define-error 'rlm-error "rlm" 'user-error)

(defvar rlm--connection nil
  "The jsonrpc connection to the daemon, or nil.")

(defvar rlm--daemon-process nil
  "The daemon process Emacs started last, or nil.")

(defvar rlm--jobs (make-hash-table :test #'equal)
  "Running jobs: job id (a string) to `rlm-job'.")

(defvar rlm--recent-jobs nil
  "Jobs of this session, newest first (for `rlm-trace').")

(defvar rlm--job-counter 0
  "Counter making job ids unique within this Emacs.")

(defvar rlm-question-history nil
  "Minibuffer history of questions.")

(defvar rlm-context-history nil
  "Minibuffer history of context names.")

(defun rlm--plist (&rest plist)
  "Return PLIST without the keys whose value is nil."
  (let (out)
    (while plist
      (when (cadr plist)
        (setq out (cons (cadr plist) (cons (car plist) out))))
      (setq plist (cddr plist)))
    (nreverse out)))

(defun rlm--merge-plists (&rest plists)
  "Merge PLISTS; later values win and nil values are dropped."
  (let (out)
    (dolist (pl plists)
      (while pl
        (setq out (plist-put out (car pl) (cadr pl)))
        (setq pl (cddr pl))))
    (apply #'rlm--plist out)))

(defun rlm--truncate (string width)
  "Return STRING on one line, cut to WIDTH characters."
  (truncate-string-to-width
   (replace-regexp-in-string "[\n\t ]+" " " (string-trim string))
   width nil nil "…"))

(defun rlm--format-count (n)
  "Return N with a k or M suffix when large."
  (cond ((not (numberp n)) "?")
        ((>= n 1000000) (format "%.1fM" (/ n 1e6)))
        ((>= n 1000) (format "%.1fk" (/ n 1e3)))
        (t (format "%d" n))))

(defun rlm--tokens-total (tokens)
  "Return a number of tokens from TOKENS, a number or an input/output plist."
  (cond ((numberp tokens) tokens)
        ((and (consp tokens) (keywordp (car tokens)))
         (+ (or (plist-get tokens :input) 0) (or (plist-get tokens :output) 0)))))

;;;; Jobs

(cl-defstruct (rlm-job (:constructor rlm--job-create) (:copier nil))
  "One query sent to the daemon."
  id question context description buffer connection
  (state 'connecting) (iteration 0) (sub-calls 0) (subcall-events 0)
  tokens cost start-time end-time answer result error partial
  finished reply callback answer-marker overlay timer change-group
  (last-kind nil) (turn 0) (turn-text "") (code-in-text nil) (toggled nil))

;;;; Socket and connection

(defun rlm-default-socket-path ()
  "Return the default socket path, as the daemon computes it.
This follows the daemon: $RLMD_SOCKET, else the rlmd directory in
the user's runtime directory ($XDG_RUNTIME_DIR, else /run/user/UID
when it is a directory we own, else TMPDIR/runtime-UID)."
  (let ((env (getenv "RLMD_SOCKET"))
        (xdg (getenv "XDG_RUNTIME_DIR"))
        (run (format "/run/user/%d" (user-uid))))
    (cond
     ((and env (not (string-empty-p env))) env)
     (t
      (expand-file-name
       "rlmd/rlmd.sock"
       (cond ((and xdg (not (string-empty-p xdg))) xdg)
             ;; platformdirs takes /run/user/UID only when it is a real
             ;; directory of ours with mode 0700.
             ((and (file-directory-p run)
                   (not (file-symlink-p run))
                   (eql (file-attribute-user-id (file-attributes run 'integer))
                        (user-uid))
                   (eql (logand (or (file-modes run) 0) #o777) #o700))
              run)
             (t (expand-file-name
                 (format "runtime-%d" (user-uid))
                 ;; Python's tempfile.gettempdir(), for writable directories.
                 (or (cl-find-if (lambda (d) (and d (not (string-empty-p d))
                                                  (file-directory-p d)
                                                  (file-writable-p d)))
                                 (list (getenv "TMPDIR") (getenv "TEMP") (getenv "TMP")))
                     "/tmp")))))))))

(defun rlm-socket ()
  "Return the socket path in use: `rlm-socket-path' or the default."
  (expand-file-name (or rlm-socket-path (rlm-default-socket-path))))

(defun rlm--replace-nul-escapes (string)
  "Return STRING, JSON text, with every \\u0000 escape made \\ufffd.
Both escapes are six bytes long, so Content-Length stays right."
  (if (not (string-search "u0000" string))
      string
    (replace-regexp-in-string
     "\\\\+u0000"
     (lambda (match)
       ;; An odd run of backslashes ends in an escape; an even one is
       ;; escaped backslashes followed by the letters u0000.
       (if (cl-oddp (- (length match) 5))
           (concat (substring match 0 -5) "ufffd")
         match))
     string t t)))

(defun rlm--nul-safe-filter (filter)
  "Return a process filter passing text to FILTER without \\u0000 escapes.
Emacs 28 cannot parse JSON holding \\u0000 (jsonrpc.el then drops the
whole message, so a reply would never arrive); U+FFFD replaces it.
An escape split between two reads is held back until the next one."
  (let ((pending ""))
    (lambda (proc string)
      (let* ((text (concat pending string))
             (cut (if (string-match "\\\\+\\(?:u0?0?0?\\)?\\'" text)
                      (match-beginning 0)
                    (length text))))
        (setq pending (substring text cut))
        (funcall filter proc (rlm--replace-nul-escapes (substring text 0 cut)))))))

(defun rlm--make-connection (process)
  "Wrap PROCESS, a connected socket, in a jsonrpc connection."
  (let* ((args (list :name "rlm"
                     :process (lambda () process)
                     :notification-dispatcher #'rlm--dispatch-notification
                     :request-dispatcher #'ignore
                     :on-shutdown #'rlm--on-shutdown))
         (conn
          ;; jsonrpc 1.0.20 (Emacs 30) renamed the log size initarg and
          ;; warns about the old one; Emacs 28's jsonrpc knows only that.
          (condition-case nil
              (apply #'make-instance 'jsonrpc-process-connection
                     :events-buffer-config (list :size rlm-events-buffer-size) args)
            (invalid-slot-name
             (apply #'make-instance 'jsonrpc-process-connection
                    :events-buffer-scrollback-size rlm-events-buffer-size args)))))
    (set-process-filter process (rlm--nul-safe-filter (process-filter process)))
    conn))

(defun rlm--try-connect (path)
  "Connect to the daemon on PATH; return a connection or nil."
  (when (file-exists-p path)
    (condition-case nil
        (rlm--make-connection
         (make-network-process :name "rlm" :family 'local :service path
                               :noquery t :coding 'utf-8-unix))
      (file-error nil))))

(defun rlm--daemon-output (buffer)
  "Return the last line of BUFFER, the daemon's output."
  (if (buffer-live-p buffer)
      (with-current-buffer buffer
        (let ((text (string-trim (buffer-string))))
          (if (string-empty-p text) "no output"
            (car (last (split-string text "\n" t))))))
    "no output"))

(defun rlm--daemon-filter (proc string)
  "Append STRING, output of the daemon PROC, to its buffer, kept small."
  (let ((buf (process-buffer proc)))
    (when (buffer-live-p buf)
      (with-current-buffer buf
        (save-excursion
          (goto-char (point-max))
          (insert string)
          ;; A long-lived daemon logs forever; keep the last 64 KiB.
          (when (> (buffer-size) 131072)
            (delete-region (point-min) (- (point-max) 65536))))))))

(defun rlm--start-daemon (path)
  "Start the daemon on socket PATH and return a connection to it.
Waits at most `rlm-daemon-start-timeout' seconds; signals
`rlm-error' saying why when the daemon does not answer."
  (unless rlm-daemon-command
    (signal 'rlm-error
            (list (format "no daemon answers on %s (start one with `rlmd', or set `rlm-daemon-command')"
                          path))))
  (unless (executable-find (car rlm-daemon-command))
    (signal 'rlm-error
            (list (format "cannot start the daemon: `%s' is not an executable program (install rlmd or set `rlm-daemon-command')"
                          (car rlm-daemon-command)))))
  (let* ((command (append rlm-daemon-command (list "--socket" path)))
         (out (get-buffer-create " *rlmd*"))
         (proc
          (condition-case err
              ;; A local directory, even when the current buffer is remote.
              (let ((default-directory (expand-file-name "~/")))
                (with-current-buffer out (let ((inhibit-read-only t)) (erase-buffer)))
                (make-process :name "rlmd" :buffer out :command command
                              :noquery t :connection-type 'pipe
                              :filter #'rlm--daemon-filter
                              :sentinel #'ignore))
            (error
             (signal 'rlm-error
                     (list (format "cannot start the daemon with `%s': %s (set `rlm-daemon-command')"
                                   (string-join command " ")
                                   (error-message-string err)))))))
         (deadline (+ (float-time) rlm-daemon-start-timeout))
         conn)
    (setq rlm--daemon-process proc)
    (message "rlm: starting the daemon (%s)..." (car command))
    (while (and (not (setq conn (rlm--try-connect path)))
                (process-live-p proc)
                (< (float-time) deadline))
      (accept-process-output proc 0.1))
    (or conn
        (progn
          (setq conn (rlm--try-connect path)) ; one last look
          conn)
        (let ((why (if (process-live-p proc)
                       (progn (delete-process proc)
                              (format "no answer on %s after %s s"
                                      path rlm-daemon-start-timeout))
                     (format "`%s' exited with status %s: %s"
                             (string-join command " ")
                             (process-exit-status proc)
                             (rlm--daemon-output out)))))
          (signal 'rlm-error (list (format "the daemon did not start: %s" why)))))))

(defun rlm-connection ()
  "Return a live connection to the daemon.
Connect to the socket of `rlm-socket'; when nothing answers there,
start the daemon with `rlm-daemon-command' and wait (bounded) for it."
  (if (and rlm--connection (jsonrpc-running-p rlm--connection))
      rlm--connection
    (let ((path (rlm-socket)))
      (setq rlm--connection
            (or (rlm--try-connect path)
                (rlm--start-daemon path))))))

(defun rlm-disconnect ()
  "Close the connection to the daemon, leaving the daemon running."
  (interactive)
  (when rlm--connection
    (let ((conn rlm--connection))
      (setq rlm--connection nil)
      (ignore-errors (jsonrpc-shutdown conn t)))))

(defun rlm--on-shutdown (conn)
  "Forget CONN when its socket closes and fail the jobs it carried."
  (when (eq conn rlm--connection)
    (setq rlm--connection nil))
  (dolist (job (hash-table-values rlm--jobs))
    (when (eq (rlm-job-connection job) conn)
      (rlm--job-finish job 'error "the connection to the daemon was lost"))))

(defun rlm--error-message (err)
  "Return a readable message from ERR, a jsonrpc error plist or condition."
  (cond
   ((and (consp err) (keywordp (car err)))
    (let ((msg (plist-get err :message))
          (kind (plist-get (plist-get err :data) :kind)))
      (concat (or msg "unknown error")
              (if (and kind (stringp kind)) (format " [%s]" kind) ""))))
   ((eq (car-safe err) 'jsonrpc-error)
    (or (alist-get 'jsonrpc-error-message (cdr err))
        (format "%s" (cdr err))))
   (t (error-message-string err))))

(defun rlm-request (method &optional params timeout)
  "Call METHOD (a symbol such as `context/list') with PARAMS and wait.
PARAMS is a plist; nil sends an empty object.  TIMEOUT defaults to
`rlm-request-timeout'.  Return the result; signal `rlm-error' with
the daemon's message on failure."
  (let ((conn (rlm-connection)))
    (condition-case err
        (jsonrpc-request conn method (or params (make-hash-table))
                         :timeout (or timeout rlm-request-timeout))
      (jsonrpc-error
       (signal 'rlm-error
               (list (format "%s: %s" method (rlm--error-message err))))))))

(defun rlm--new-job-id ()
  "Return a fresh job id."
  (format "emacs-%d-%d-%04x" (emacs-pid) (cl-incf rlm--job-counter) (random 65536)))

(defun rlm-job-running-p (job)
  "Return non-nil if JOB has not finished."
  (not (rlm-job-finished job)))

(defun rlm--dispatch-notification (_conn method params)
  "Route notification METHOD with PARAMS to its job."
  (when (eq method 'query/event)
    (let ((job (gethash (plist-get params :job) rlm--jobs)))
      (when (and job (not (rlm-job-finished job)))
        (condition-case err
            (rlm--job-event job params)
          (error (message "rlm: bad event %S: %s" (plist-get params :kind)
                          (error-message-string err))))))))

;;;; Result buffer

(defvar rlm-result-mode-map
  (let ((map (make-sparse-keymap)))
    (define-key map (kbd "C-c C-k") #'rlm-cancel)
    (define-key map (kbd "C-g") #'rlm-cancel-or-quit)
    (define-key map (kbd "TAB") #'rlm-toggle-trajectory)
    (define-key map (kbd "t") #'rlm-trace)
    (define-key map (kbd "w") #'rlm-copy-answer)
    map)
  "Keymap of `rlm-result-mode'.")

(defvar-local rlm--job nil
  "The job whose result this buffer shows.")

(define-derived-mode rlm-result-mode special-mode "rlm"
  "Major mode of rlm result buffers.
The answer is inserted under the question; the trajectory (code,
output and sub-calls) is folded below it.

\\{rlm-result-mode-map}"
  (setq-local header-line-format '(:eval (rlm--header-line)))
  (setq-local revert-buffer-function #'rlm--revert-refused)
  (setq-local truncate-lines nil)
  (visual-line-mode 1))

(defun rlm--revert-refused (&rest _)
  "Refuse to revert a result buffer."
  (user-error "An rlm result buffer cannot be reverted; ask again with `rlm-query'"))

(defun rlm--state-text (job)
  "Return a short description of JOB's state."
  (pcase (rlm-job-state job)
    ('connecting "connecting")
    ('thinking "thinking")
    ('running-code "running code")
    ('sub-calls "waiting for sub-calls")
    ('cancelling "cancelling")
    ('done "done")
    ('cancelled "cancelled")
    ('error "failed")
    (s (format "%s" s))))

(defun rlm-job-elapsed (job)
  "Return the seconds JOB has run (until now or its end)."
  (if (rlm-job-start-time job)
      (- (or (rlm-job-end-time job) (float-time)) (rlm-job-start-time job))
    0))

(defun rlm--header-line ()
  "Return the header line of a result buffer."
  (let ((job rlm--job))
    (if (not job) "rlm"
      (let ((tokens (rlm--tokens-total (rlm-job-tokens job)))
            (cost (rlm-job-cost job)))
        (concat
         (propertize (format " rlm: %s" (rlm--state-text job))
                     'face (pcase (rlm-job-state job)
                             ('error 'rlm-error)
                             ((or 'done 'cancelled) 'success)
                             (_ 'warning)))
         (if (> (rlm-job-iteration job) 0)
             (format " · turn %d" (rlm-job-iteration job)) "")
         (format " · %d sub-call%s" (rlm-job-sub-calls job)
                 (if (= (rlm-job-sub-calls job) 1) "" "s"))
         (if tokens (format " · %s tokens" (rlm--format-count tokens)) "")
         (if (and (numberp cost) (> cost 0)) (format " · $%.4f" cost) "")
         (format " · %.1fs" (rlm-job-elapsed job))
         (if (rlm-job-finished job) ""
           (substitute-command-keys
            "   \\<rlm-result-mode-map>\\[rlm-cancel] cancel")))))))

(defun rlm--result-buffer-name (question)
  "Return a name for the result buffer of QUESTION."
  (format "*rlm: %s*" (rlm--truncate question 50)))

(defmacro rlm--in-result (job &rest body)
  "Run BODY in JOB's result buffer, writable, keeping point and windows."
  (declare (indent 1) (debug t))
  (let ((buf (make-symbol "buf")))
    `(let ((,buf (rlm-job-buffer ,job)))
       (when (buffer-live-p ,buf)
         (with-current-buffer ,buf
           (let ((inhibit-read-only t))
             (save-excursion ,@body)))))))

(defun rlm--setup-result-buffer (job)
  "Create and fill the result buffer of JOB; return it."
  (let ((buf (generate-new-buffer (rlm--result-buffer-name (rlm-job-question job)))))
    (with-current-buffer buf
      (rlm-result-mode)
      (setq rlm--job job)
      (add-hook 'kill-buffer-hook #'rlm--cancel-on-kill nil t)
      (let ((inhibit-read-only t))
        (insert (propertize "Question: " 'face 'rlm-label)
                (rlm-job-question job) "\n")
        (when (rlm-job-description job)
          (insert (propertize "Context: " 'face 'rlm-label)
                  (rlm-job-description job) "\n"))
        (insert "\n")
        (let ((answer-pos (point)))
          (insert "\n")
          ;; Created after the text that follows it, so that only answer
          ;; insertions push it forward.
          (setf (rlm-job-answer-marker job) (copy-marker answer-pos t)))
        (insert-text-button "▾ Trajectory"
                            'face 'rlm-heading
                            'action (lambda (_) (rlm-toggle-trajectory))
                            'follow-link t
                            'help-echo "Show or hide the model's work")
        (insert "\n")
        (let ((ov (make-overlay (point) (point) nil nil t)))
          (overlay-put ov 'rlm-trajectory t)
          (overlay-put ov 'invisible (not rlm-show-trajectory-while-running))
          (setf (rlm-job-overlay job) ov)))
      (goto-char (point-min))
      (setq buffer-undo-list nil)
      (let ((group (prepare-change-group)))
        (activate-change-group group)
        (setf (rlm-job-change-group job) group))
      (set-buffer-modified-p nil))
    buf))

(defun rlm--cancel-on-kill ()
  "Cancel the query of this result buffer, which is being killed."
  (when (and rlm--job (rlm-job-running-p rlm--job))
    (rlm-cancel-job rlm--job "its buffer was killed")))

(defun rlm--trajectory-insert (job &rest strings)
  "Append STRINGS at the end of JOB's trajectory."
  (rlm--in-result job
    (goto-char (point-max))
    (apply #'insert strings)
    (let ((ov (rlm-job-overlay job)))
      (when (overlay-buffer ov)
        (move-overlay ov (overlay-start ov) (point-max))))))

(defun rlm--indent (ev text)
  "Indent TEXT by the nesting depth of event EV (2 spaces a level)."
  (let ((depth (plist-get ev :depth)))
    (if (and (numberp depth) (> depth 1))
        (replace-regexp-in-string "^" (make-string (* 2 (1- depth)) ?\s) text)
      text)))

(defun rlm--trajectory-fresh-line (job)
  "Start a new line in JOB's trajectory unless at the start of one."
  (let ((buf (rlm-job-buffer job)))
    (when (and (buffer-live-p buf)
               (with-current-buffer buf
                 (and (> (buffer-size) 0)
                      (not (eq (char-before (point-max)) ?\n)))))
      (rlm--trajectory-insert job "\n"))))

(defun rlm--trajectory-heading (job text)
  "Insert heading TEXT into JOB's trajectory."
  (rlm--trajectory-fresh-line job)
  (rlm--trajectory-insert job (propertize text 'face 'rlm-heading) "\n"))

(defun rlm--insert-answer (job text &optional face)
  "Insert TEXT as JOB's answer (at its answer marker) with FACE."
  (rlm--in-result job
    (goto-char (rlm-job-answer-marker job))
    (let ((start (point)))
      (insert (if face (propertize text 'face face) text))
      (unless (eq (char-before) ?\n) (insert "\n"))
      (put-text-property start (point) 'rlm-answer t))))

(defun rlm-toggle-trajectory ()
  "Show or hide the trajectory in this result buffer."
  (interactive)
  (let ((ov (and rlm--job (rlm-job-overlay rlm--job))))
    (unless ov (user-error "Not in an rlm result buffer"))
    (overlay-put ov 'invisible (not (overlay-get ov 'invisible)))
    (setf (rlm-job-toggled rlm--job) t)))

(defun rlm-copy-answer ()
  "Copy the answer of this result buffer to the kill ring."
  (interactive)
  (let ((answer (and rlm--job (rlm-job-answer rlm--job))))
    (unless answer (user-error "No answer yet"))
    (kill-new answer)
    (message "rlm: answer copied")))

;;;; Events

(defun rlm--job-event (job ev)
  "Apply event EV (a `query/event' params plist) to JOB."
  (let ((kind (plist-get ev :kind)))
    (pcase kind
      ("root_delta"
       (let ((text (or (plist-get ev :text) "")))
         (setf (rlm-job-state job) 'thinking)
         ;; The model's text after anything else starts a new turn.
         (unless (equal (rlm-job-last-kind job) "root_delta")
           (cl-incf (rlm-job-turn job))
           (setf (rlm-job-code-in-text job) nil
                 (rlm-job-turn-text job) "")
           (rlm--trajectory-heading job (format "Turn %d" (rlm-job-turn job))))
         ;; A fence may arrive split over several deltas.
         (setf (rlm-job-turn-text job) (concat (rlm-job-turn-text job) text))
         (when (string-match-p "^[ \t]*```" (rlm-job-turn-text job))
           (setf (rlm-job-code-in-text job) t))
         (rlm--trajectory-insert job (propertize text 'face 'rlm-root-text))))
      ("code"
       (let ((code (or (plist-get ev :code) "")))
         (setf (rlm-job-state job) 'running-code)
         (rlm--trajectory-fresh-line job)
         (rlm--trajectory-insert
          job
          (rlm--indent
           ev (if (and (rlm-job-code-in-text job) (not (plist-get ev :depth)))
                  (propertize (format "▶ running the block (%d lines)\n"
                                      (1+ (cl-count ?\n (string-trim code))))
                              'face 'rlm-code)
                (concat (propertize "▶ running:\n" 'face 'rlm-heading)
                        (propertize (string-trim-right code) 'face 'rlm-code) "\n"))))))
      ("output"
       (let ((text (string-trim-right (or (plist-get ev :text) ""))))
         (setf (rlm-job-state job) 'thinking)
         (rlm--trajectory-fresh-line job)
         (rlm--trajectory-insert
          job (rlm--indent
               ev (concat (propertize "⇒ output:" 'face 'rlm-heading)
                          (if (string-empty-p text) " (nothing)\n"
                            (concat "\n" (propertize text 'face 'rlm-output) "\n")))))))
      ("subcall"
       (let* ((status (plist-get ev :status))
              (starting (member status '(nil "start")))
              (elapsed (plist-get ev :elapsed_s)))
         (when starting
           (cl-incf (rlm-job-subcall-events job))
           (setf (rlm-job-state job) 'sub-calls))
         (rlm--trajectory-fresh-line job)
         (rlm--trajectory-insert
          job (rlm--indent
               ev (propertize
                   (concat
                    (format "↳ %s%s" (or (plist-get ev :fn) "sub-call")
                            (if-let* ((id (plist-get ev :id))) (format " %s" id) ""))
                    (if starting
                        (concat
                         (if-let* ((m (plist-get ev :model))) (format " to %s" m) "")
                         (if-let* ((n (plist-get ev :prompt_chars)))
                             (format " (%s chars)" (rlm--format-count n)) ""))
                      (concat (format ": %s" status)
                              (if (numberp elapsed) (format " in %.2f s" elapsed) "")
                              (if-let* ((e (plist-get ev :error))) (format " (%s)" e) "")))
                    "\n")
                   'face (if (member status '("error" "failed")) 'rlm-error 'rlm-subcall))))))
      ("progress"
       (let ((iter (plist-get ev :iteration)))
         (when (numberp iter)
           (setf (rlm-job-iteration job) iter)))
       (when (numberp (plist-get ev :sub_calls))
         (setf (rlm-job-sub-calls job) (plist-get ev :sub_calls)))
       (when (plist-get ev :tokens) (setf (rlm-job-tokens job) (plist-get ev :tokens)))
       (when (numberp (plist-get ev :cost)) (setf (rlm-job-cost job) (plist-get ev :cost))))
      ("final"
       (let ((answer (plist-get ev :answer)))
         (when (and (stringp answer) (not (rlm-job-answer job)))
           (setf (rlm-job-answer job) answer)
           (rlm--insert-answer job answer))))
      ("error"
       (setf (rlm-job-error job) (or (plist-get ev :message) "unknown error"))
       (when (plist-get ev :partial)
         (setf (rlm-job-partial job) (plist-get ev :partial)))))
    (when (and (equal kind "subcall") (= (rlm-job-sub-calls job) 0))
      (setf (rlm-job-sub-calls job) (rlm-job-subcall-events job)))
    (unless (equal kind "progress")
      (setf (rlm-job-last-kind job) kind))
    (rlm--refresh-header job)))

(defun rlm--refresh-header (job)
  "Redisplay the header line of JOB's buffer."
  (let ((buf (rlm-job-buffer job)))
    (when (buffer-live-p buf)
      (with-current-buffer buf (force-mode-line-update)))))

(defun rlm--job-succeeded (job result)
  "Finish JOB with RESULT, the response of `query/run'."
  (setf (rlm-job-reply job) (list :result result))
  (unless (rlm-job-finished job)
    (setf (rlm-job-result job) result)
    (when-let* ((tokens (plist-get result :tokens))) (setf (rlm-job-tokens job) tokens))
    (when (numberp (plist-get result :cost)) (setf (rlm-job-cost job) (plist-get result :cost)))
    (when (numberp (plist-get result :sub_calls))
      (setf (rlm-job-sub-calls job) (plist-get result :sub_calls)))
    (when (numberp (plist-get result :iterations))
      (setf (rlm-job-iteration job) (plist-get result :iterations)))
    (let ((answer (plist-get result :answer)))
      (unless (rlm-job-answer job)
        (setf (rlm-job-answer job) (if (stringp answer) answer (format "%s" answer)))
        (rlm--insert-answer job (rlm-job-answer job))))
    (rlm--job-finish job 'done)))

(defun rlm--job-failed (job err)
  "Finish JOB with ERR, a JSON-RPC error plist."
  (setf (rlm-job-reply job) (list :error err))
  (unless (rlm-job-finished job)
    (let ((partial (plist-get (plist-get err :data) :partial)))
      (when (stringp partial) (setf (rlm-job-partial job) partial)))
    (rlm--job-finish job (if (eql (plist-get err :code) -32005) 'cancelled 'error)
                     (if (eql (plist-get err :code) -1) ; jsonrpc: the socket closed
                         "the daemon closed the connection (it stopped or died); see its log"
                       (rlm--error-message err)))))

(defun rlm--job-finish (job status &optional message)
  "Mark JOB finished with STATUS (done, error or cancelled) and MESSAGE.
Does nothing when JOB already finished."
  (unless (rlm-job-finished job)
    (setf (rlm-job-finished job) t
          (rlm-job-state job) status
          (rlm-job-end-time job) (float-time))
    (remhash (rlm-job-id job) rlm--jobs)
    (when (rlm-job-timer job) (cancel-timer (rlm-job-timer job)))
    (when message (setf (rlm-job-error job) message))
    (pcase status
      ('error
       (rlm--insert-answer job (format "Error: %s" message) 'rlm-error)
       (let ((partial (rlm-job-partial job)))
         (when (and (stringp partial) (not (string-blank-p partial)))
           (rlm--insert-answer job (concat "Partial answer:\n" partial))))
       (message "rlm: query failed: %s"
                (car (split-string (or message "") "\n" t))))
      ('cancelled
       (rlm--insert-answer job (format "Cancelled%s" (if message (format ": %s" message) ""))
                           'rlm-error)
       (message "rlm: query cancelled")))
    (let ((buf (rlm-job-buffer job)))
      (when (buffer-live-p buf)
        (with-current-buffer buf
          (let ((ov (rlm-job-overlay job)))
            ;; Fold the trajectory under the answer, unless the user
            ;; chose a state meanwhile.
            (when (and ov (eq status 'done) (not (rlm-job-toggled job)))
              (overlay-put ov 'invisible t)))
          (rlm--trajectory-heading
           job (format "End: %s after %.1f s" (rlm--state-text job) (rlm-job-elapsed job)))
          (when-let* ((group (rlm-job-change-group job)))
            ;; One undo step for the whole answer.
            (undo-amalgamate-change-group group)
            (accept-change-group group))
          (set-buffer-modified-p nil)
          (force-mode-line-update))))
    (when (rlm-job-callback job)
      (with-demoted-errors "rlm: callback failed: %S"
        (funcall (rlm-job-callback job) job)))
    (when (eq status 'done)
      (with-demoted-errors "rlm: a function of `rlm-query-finished-functions' failed: %S"
        (run-hook-with-args 'rlm-query-finished-functions
                            (rlm-job-answer job) (rlm-job-buffer job)))
      (when (rlm-job-buffer job)
        (message "rlm: answered in %.1f s" (rlm-job-elapsed job))))))

;;;; Contexts

(defun rlm--sanitize-name (string)
  "Return STRING usable inside a context name."
  ;; The daemon takes any printable name of at most 256 characters.
  (let ((s (replace-regexp-in-string "[[:cntrl:]]+" " " string)))
    (cond ((string-empty-p s) "_")
          ((> (length s) 200)
           (concat (substring s 0 150) "…" (substring (secure-hash 'sha1 s) 0 12)))
          (t s))))

(defvar-local rlm--sent-contexts nil
  "Contexts sent from this buffer: alist of name to modification tick.")

(defun rlm--context-exists-p (name)
  "Return non-nil if a context NAME exists in the daemon."
  (condition-case nil
      (progn (rlm-request 'context/info (list :name name)) t)
    (rlm-error nil)))

(defun rlm-put-text (name text &optional append)
  "Store TEXT as the daemon's context NAME (APPEND to it when non-nil).
Return the daemon's description of the context."
  (condition-case nil
      (rlm-request 'context/put (rlm--plist :name name :text text :append append)
                   rlm-put-timeout)
    ;; JSON carries Unicode only: raw bytes (a binary file, a bad
    ;; decoding) become U+FFFD, as a UTF-8 decoder would make them.
    (wrong-type-argument
     (rlm-request 'context/put
                  (rlm--plist :name name :append append
                              :text (replace-regexp-in-string
                                     (format "[%c-%c]" #x3fff80 #x3fffff) "\ufffd" text t t))
                  rlm-put-timeout))))

(defun rlm--put-via-file (name start end)
  "Store the current buffer from START to END as context NAME via a file.
Return non-nil on success, nil when the daemon could not use the file."
  (let ((file (make-temp-file "rlm-put-" nil ".txt")))
    (unwind-protect
        (condition-case err
            (progn
              (let ((coding-system-for-write 'utf-8-unix)
                    (write-region-inhibit-fsync t))
                (write-region start end file nil 'silent))
              (rlm-request 'context/put (list :name name :path file) rlm-put-timeout)
              t)
          (rlm-error
           (message "rlm: the daemon could not read %s (%s); sending the text instead"
                    file (error-message-string err))
           nil))
      (delete-file file))))

(defun rlm-buffer-context (&optional buffer start end)
  "Send the text of BUFFER from START to END as a named context.
The whole (widened) buffer when START and END are nil.  Return the
context's name.  The text is sent only when the buffer changed since
it was last sent (or the daemon lost it): the name is
emacs:BUFFER (plus :START-END for a part) and the cache is keyed by
the buffer's modification tick."
  (with-current-buffer (or buffer (current-buffer))
    (save-restriction
      (widen)
      (let* ((whole (and (or (null start) (= start (point-min)))
                         (or (null end) (= end (point-max)))))
             (start (or start (point-min)))
             (end (or end (point-max)))
             (name (concat "emacs:" (rlm--sanitize-name (buffer-name))
                           (if whole "" (format ":%d-%d" start end))))
             (tick (buffer-chars-modified-tick))
             (cached (assoc name rlm--sent-contexts)))
        (unless (and cached (eql (cdr cached) tick) (rlm--context-exists-p name))
          (when (> (- end start) 1000000)
            (message "rlm: sending %s (%s)..." name
                     (file-size-human-readable (- end start))))
          (unless (and rlm-file-transfer-threshold
                       (>= (- end start) rlm-file-transfer-threshold)
                       (rlm--put-via-file name start end))
            (rlm-put-text name (buffer-substring-no-properties start end)))
          (setf (alist-get name rlm--sent-contexts nil nil #'equal) tick))
        name))))

(defun rlm-files-context (paths)
  "Have the daemon read PATHS (files or directories) into one context.
Return the context's name."
  (let* ((paths (mapcar (lambda (p) (directory-file-name (expand-file-name p))) paths))
         (name (concat "files:"
                       (rlm--sanitize-name
                        (if (cdr paths)
                            (format "%s+%d" (abbreviate-file-name (car paths))
                                    (1- (length paths)))
                          (abbreviate-file-name (car paths))))))
         (first t))
    (dolist (p paths)
      (when (file-remote-p p)
        (signal 'rlm-error (list (format "%s is remote; the daemon reads local files only" p))))
      (unless (file-exists-p p)
        (signal 'rlm-error (list (format "%s does not exist" p)))))
    (message "rlm: the daemon is reading %s..." (string-join paths ", "))
    (dolist (p paths)
      (rlm-request 'context/put (rlm--plist :name name :path p :append (not first))
                   rlm-put-timeout)
      (setq first nil))
    name))

(defun rlm-context-names ()
  "Return the names of the daemon's contexts."
  (mapcar (lambda (c) (plist-get c :name)) (rlm-request 'context/list)))

(defun rlm--read-context (&optional prompt)
  "Read a context name with completion, using PROMPT."
  (completing-read (or prompt "Context: ") (rlm-context-names) nil t nil
                   'rlm-context-history))

;;;; Starting queries

(cl-defun rlm-start-query (question &key context description options
                                    (display t) callback buffer-name)
  "Ask QUESTION of the daemon; return the `rlm-job'.
CONTEXT is the name of a context the daemon holds (nil: none).
DESCRIPTION says what the context is, for the result buffer.
OPTIONS is a plist merged over `rlm-query-options'.  DISPLAY non-nil
shows the result buffer with `rlm-display-buffer-action'.  CALLBACK,
if non-nil, is called with the job when it ends (however it ends).
BUFFER-NAME overrides the result buffer's name."
  (let* ((conn (rlm-connection))
         (job (rlm--job-create :id (rlm--new-job-id) :question question
                               :context context :description description
                               :connection conn :callback callback
                               :start-time (float-time)))
         (buf (rlm--setup-result-buffer job))
         (options (rlm--merge-plists rlm-query-options options)))
    (setf (rlm-job-buffer job) buf)
    (when buffer-name
      (with-current-buffer buf (rename-buffer buffer-name t)))
    (puthash (rlm-job-id job) job rlm--jobs)
    (push job rlm--recent-jobs)
    (when (> (length rlm--recent-jobs) 50)
      (setcdr (nthcdr 49 rlm--recent-jobs) nil))
    (setf (rlm-job-timer job)
          (run-with-timer 1 1 #'rlm--refresh-header job))
    (when display (display-buffer buf rlm-display-buffer-action))
    (setf (rlm-job-state job) 'thinking)
    (condition-case err
        (jsonrpc-async-request
         conn 'query/run
         (rlm--plist :query question :context context :job (rlm-job-id job)
                     :options options)
         :success-fn (lambda (result) (rlm--job-succeeded job result))
         :error-fn (lambda (err) (rlm--job-failed job err))
         :timeout nil)
      (error
       (rlm--job-finish job 'error (format "could not send the query: %s"
                                           (error-message-string err)))))
    job))

(defun rlm--read-question ()
  "Read a question in the minibuffer."
  (let ((q (read-string "Ask rlm: " nil 'rlm-question-history)))
    (when (string-blank-p q) (user-error "No question"))
    q))

;;;###autoload
(defun rlm-query-buffer (question &optional buffer)
  "Ask QUESTION about BUFFER (default: the current buffer), all of it."
  (interactive (list (rlm--read-question)))
  (let* ((buffer (or buffer (current-buffer)))
         (name (rlm-buffer-context buffer)))
    (rlm-start-query question :context name
                     :description (format "buffer %s (%s chars)" (buffer-name buffer)
                                          (with-current-buffer buffer
                                            (save-restriction (widen) (buffer-size)))))))

;;;###autoload
(defun rlm-query-region (question start end)
  "Ask QUESTION about the text between START and END."
  (interactive
   (if (use-region-p)
       (list (rlm--read-question) (region-beginning) (region-end))
     (user-error "No active region")))
  (let ((name (rlm-buffer-context (current-buffer) (min start end) (max start end))))
    (rlm-start-query question :context name
                     :description (format "region %d-%d of %s (%d chars)"
                                          start end (buffer-name) (abs (- end start))))))

(defun rlm-subtree-bounds ()
  "Return (START END HEADING) of the Org subtree at point."
  (require 'org)
  (save-excursion
    (when (org-before-first-heading-p)
      (user-error "Point is before the first heading"))
    (org-back-to-heading t)
    (let ((start (point))
          (heading (org-get-heading t t t t)))
      (org-end-of-subtree t t)
      (list start (point) heading))))

;;;###autoload
(defun rlm-query-subtree (question)
  "Ask QUESTION about the Org subtree at point."
  (interactive (list (rlm--read-question)))
  (unless (derived-mode-p 'org-mode) (user-error "Not in an Org buffer"))
  (pcase-let* ((`(,start ,end ,heading) (rlm-subtree-bounds))
               (name (rlm-buffer-context (current-buffer) start end)))
    (rlm-start-query question :context name
                     :description (format "subtree \"%s\" of %s (%d chars)"
                                          heading (buffer-name) (- end start)))))

;;;###autoload
(defun rlm-query (question &optional whole-buffer)
  "Ask QUESTION about the text at hand; return the `rlm-job'.
The context is the active region, else in Org mode the current
subtree (the whole buffer with WHOLE-BUFFER, interactively a prefix
argument, or before the first heading), else the buffer."
  (interactive (list (rlm--read-question) current-prefix-arg))
  (cond
   ((use-region-p) (rlm-query-region question (region-beginning) (region-end)))
   ((and (derived-mode-p 'org-mode) (not whole-buffer)
         (progn (require 'org) (not (org-before-first-heading-p))))
    (rlm-query-subtree question))
   (t (rlm-query-buffer question))))

(defun rlm--read-files ()
  "Read files or a directory: the marked files in Dired, else one path."
  (if (derived-mode-p 'dired-mode)
      (or (dired-get-marked-files) (user-error "No file here"))
    (let* ((proj (and (fboundp 'project-current) (project-current)))
           (default (if proj (project-root proj) default-directory)))
      (list (read-file-name "Ask about file or directory: " default default t)))))

;;;###autoload
(defun rlm-query-files (question files)
  "Ask QUESTION about FILES, a list of files and directories.
The daemon reads them itself.  Interactively: the marked files in
Dired, else a file or directory read in the minibuffer (default:
the current project)."
  (interactive (let ((files (rlm--read-files))) (list (rlm--read-question) files)))
  (let ((name (rlm-files-context (if (listp files) files (list files)))))
    (rlm-start-query question :context name
                     :description (format "%s" (mapconcat #'abbreviate-file-name
                                                          (if (listp files) files (list files))
                                                          ", ")))))

;;;###autoload
(defun rlm-query-context (question name)
  "Ask QUESTION about NAME, a context already stored in the daemon."
  (interactive (let ((name (rlm--read-context "Ask about context: ")))
                 (list (rlm--read-question) name)))
  (rlm-start-query question :context name :description (format "context %s" name)))

(defun rlm-query-sync (question &rest args)
  "Ask QUESTION and wait for the answer; return it as a string.
ARGS are those of `rlm-start-query' plus :text (a string to ask about)
and :timeout (seconds, default none).  Signals `rlm-error' when the
query fails; \\[keyboard-quit] cancels it."
  (let* ((text (plist-get args :text))
         (timeout (plist-get args :timeout))
         (start-args (rlm--plist-without args '(:text :timeout)))
         (context (or (plist-get start-args :context)
                      (and text (rlm--text-context text))))
         (job (apply #'rlm-start-query question
                     (append (list :context context :display nil)
                             (rlm--plist-without start-args '(:context :display))))))
    (rlm-wait job timeout)
    (pcase (rlm-job-state job)
      ('done (rlm-job-answer job))
      (_ (signal 'rlm-error (list (format "query failed: %s" (rlm-job-error job))))))))

(defun rlm--plist-without (plist keys)
  "Return PLIST without KEYS."
  (let (out)
    (while plist
      (unless (memq (car plist) keys)
        (setq out (cons (cadr plist) (cons (car plist) out))))
      (setq plist (cddr plist)))
    (nreverse out)))

(defun rlm--text-context (text)
  "Store TEXT as a context named by its hash; return the name."
  (let ((name (concat "text:" (substring (secure-hash 'sha1 text) 0 16))))
    (unless (rlm--context-exists-p name)
      (rlm-put-text name text))
    name))

(defun rlm-wait (job &optional timeout)
  "Wait until JOB finishes, at most TIMEOUT seconds (nil: no limit).
Quitting or timing out cancels JOB."
  (let ((deadline (and timeout (+ (float-time) timeout)))
        (ok nil))
    (unwind-protect
        (progn
          (while (and (rlm-job-running-p job)
                      (or (not deadline) (< (float-time) deadline)))
            (accept-process-output nil 0.05))
          (setq ok t))
      (when (rlm-job-running-p job)
        (rlm-cancel-job job (if ok "timed out" "quit"))))
    job))

;;;; Cancel

(defun rlm--tell-daemon-cancel (job attempts)
  "Send `query/cancel' for JOB; ask again up to ATTEMPTS times while unknown.
A cancel can overtake its own `query/run' inside the daemon, which
then does not know the job yet; asking again shortly after settles it."
  (let ((conn (rlm-job-connection job)))
    (when (and conn (jsonrpc-running-p conn) (not (rlm-job-reply job)))
      (condition-case err
          (jsonrpc-async-request
           conn 'query/cancel (list :job (rlm-job-id job))
           :success-fn
           (lambda (result)
             (when (and (not (eq (plist-get result :cancelled) t))
                        (not (rlm-job-reply job))
                        (> attempts 0))
               (run-with-timer 0.5 nil #'rlm--tell-daemon-cancel job (1- attempts))))
           :error-fn #'ignore
           :timeout-fn #'ignore)
        (error (message "rlm: could not tell the daemon: %s" (error-message-string err)))))))

(defun rlm-cancel-job (job &optional reason)
  "Cancel JOB, telling the daemon; REASON is shown in its buffer.
The job ends at once on the Emacs side, whatever the daemon does."
  (when (rlm-job-running-p job)
    (rlm--tell-daemon-cancel job 10)
    (rlm--job-finish job 'cancelled reason)))

(defun rlm--running-jobs ()
  "Return the running jobs, newest first."
  (cl-remove-if-not #'rlm-job-running-p rlm--recent-jobs))

;;;###autoload
(defun rlm-cancel (&optional job)
  "Cancel JOB: this buffer's query, else a running query chosen by the user."
  (interactive)
  (let ((job (or job
                 (and rlm--job (rlm-job-running-p rlm--job) rlm--job)
                 (let ((running (rlm--running-jobs)))
                   (cond
                    ((null running) (user-error "No rlm query is running"))
                    ((null (cdr running)) (car running))
                    (t (let* ((alist (mapcar (lambda (j)
                                               (cons (format "%s  %s" (rlm-job-id j)
                                                             (rlm--truncate (rlm-job-question j) 60))
                                                     j))
                                             running))
                              (choice (completing-read "Cancel query: " alist nil t)))
                         (cdr (assoc choice alist)))))))))
    (if (rlm-job-running-p job)
        (rlm-cancel-job job)
      (message "rlm: that query already ended"))))

(defun rlm-cancel-or-quit ()
  "Cancel the query of this buffer if running, else `keyboard-quit'."
  (interactive)
  (if (and rlm--job (rlm-job-running-p rlm--job))
      (rlm-cancel-job rlm--job "quit")
    (keyboard-quit)))

;;;; Status and trace

;;;###autoload
(defun rlm-status ()
  "Show the daemon's status and its pool of model servers.
Return the daemon's status (a plist)."
  (interactive)
  (let* ((st (rlm-request 'daemon/status))
         (pool (condition-case nil
                   (append (plist-get (rlm-request 'pool/status) :providers) nil)
                 (rlm-error nil)))
         (providers (or pool (append (plist-get st :providers) nil)))
         (num (lambda (v fmt) (if (numberp v) (format fmt v) "-")))
         (buf (get-buffer-create "*rlm status*")))
    (with-current-buffer buf
      (let ((inhibit-read-only t))
        (erase-buffer)
        (special-mode)
        (setq-local revert-buffer-function (lambda (&rest _) (rlm-status)))
        (insert (propertize "rlm daemon" 'face 'rlm-heading) "\n\n")
        (dolist (key '(:version :pid :uptime_s :contexts :jobs :socket :state_dir :embedded))
          (let ((v (plist-get st key)))
            (when (and v (not (equal v "")))
              (insert (propertize (format "%-10s " (substring (symbol-name key) 1))
                                  'face 'rlm-label)
                      (format "%s" v) "\n"))))
        (insert "\n" (propertize
                      (format "%-16s %-9s %-6s %6s %6s %7s %7s %6s %8s %9s  %s\n"
                              "Provider" "Kind" "Health" "Load" "Queue" "TTFT" "tok/s"
                              "Errors" "Requests" "Cost" "Models")
                      'face 'rlm-heading))
        (dolist (p providers)
          (insert (format "%-16s %-9s %-6s %6s %6s %7s %7s %6s %8s %9s  %s\n"
                          (plist-get p :name) (plist-get p :kind)
                          (if (eq (plist-get p :healthy) t) "up"
                            (propertize "DOWN" 'face 'rlm-error))
                          (format "%s/%s" (plist-get p :in_flight) (plist-get p :capacity))
                          (funcall num (plist-get p :queued) "%d")
                          (funcall num (plist-get p :ewma_ttft_s) "%.2fs")
                          (funcall num (plist-get p :ewma_tokens_per_s) "%.0f")
                          (funcall num (and (numberp (plist-get p :error_rate))
                                            (* 100 (plist-get p :error_rate)))
                                   "%.0f%%")
                          (funcall num (plist-get p :requests) "%d")
                          (funcall num (plist-get p :cost) "$%.4f")
                          (mapconcat (lambda (m) (format "%s" m))
                                     (plist-get p :models) ","))))
        (when (null providers) (insert "(no providers)\n"))
        (goto-char (point-min))
        (set-buffer-modified-p nil)))
    (display-buffer buf)
    (message "rlm: daemon %s, pid %s, %d/%d providers healthy, %d in flight"
             (plist-get st :version) (plist-get st :pid)
             (cl-count-if (lambda (p) (eq (plist-get p :healthy) t)) providers)
             (length providers)
             (apply #'+ (mapcar (lambda (p) (or (plist-get p :in_flight) 0)) providers)))
    st))

(defun rlm--read-job-id ()
  "Read a job id, offering this session's jobs."
  (if (and rlm--job (derived-mode-p 'rlm-result-mode))
      (rlm-job-id rlm--job)
    (let ((alist (mapcar (lambda (j)
                           (cons (format "%s  %s" (rlm-job-id j)
                                         (rlm--truncate (rlm-job-question j) 60))
                                 (rlm-job-id j)))
                         rlm--recent-jobs)))
      (let ((choice (completing-read "Trace of job: " alist)))
        (or (cdr (assoc choice alist)) choice)))))

(defvar rlm-trace-mode-map
  (let ((map (make-sparse-keymap)))
    (define-key map (kbd "TAB") #'outline-toggle-children)
    (define-key map (kbd "<backtab>") #'outline-show-all)
    (define-key map (kbd "n") #'outline-next-visible-heading)
    (define-key map (kbd "p") #'outline-previous-visible-heading)
    map)
  "Keymap of `rlm-trace-mode'.")

(define-derived-mode rlm-trace-mode special-mode "rlm-trace"
  "Major mode showing a query's trace: one heading per record.
\\<rlm-trace-mode-map>\\[outline-toggle-children] shows or hides a record, \\[outline-show-all] shows all.

\\{rlm-trace-mode-map}"
  (setq-local outline-regexp "\\*+ ")
  (setq-local outline-level (lambda () 1))
  (outline-minor-mode 1))

(defun rlm--trace-summary (rec)
  "Return a one-line summary of trace record REC."
  (let ((kind (or (plist-get rec :type) (plist-get rec :kind) "record"))
        (first-line (lambda (key)
                      (let ((v (plist-get rec key)))
                        (and (stringp v) (rlm--truncate v 70))))))
    (concat
     (propertize (format "%-8s" kind) 'face 'rlm-heading)
     (if (numberp (plist-get rec :t)) (format " %7.2fs " (plist-get rec :t)) " ")
     (pcase kind
       ("message" (format "%s: %s" (plist-get rec :role) (funcall first-line :content)))
       ("code" (or (funcall first-line :code) ""))
       ("output" (or (funcall first-line :text) (funcall first-line :output) ""))
       ("final" (or (funcall first-line :answer) ""))
       ("start" (or (funcall first-line :query) ""))
       ("error" (or (funcall first-line :message) ""))
       ("subcall" (format "%s %s" (or (plist-get rec :model) "")
                          (or (plist-get rec :status) "")))
       (_ "")))))

(defun rlm--insert-trace-record (rec)
  "Insert REC, one trace record (a plist): a summary line, then its fields."
  (insert "* " (rlm--trace-summary rec) "\n")
  (let ((rest rec))
    (while rest
      (let ((k (car rest)) (v (cadr rest)))
        (unless (memq k '(:kind :type :t))
          (let ((s (if (stringp v) v (format "%S" v))))
            (insert (propertize (format "  %s:" (substring (symbol-name k) 1)) 'face 'rlm-label)
                    (if (string-match-p "\n" s)
                        (concat "\n" (replace-regexp-in-string
                                      "^" "    " (string-trim-right s)))
                      (concat " " s))
                    "\n"))))
      (setq rest (cddr rest)))))

;;;###autoload
(defun rlm-trace (job-id)
  "Show the trajectory of the query JOB-ID as the daemon recorded it.
In a result buffer, that buffer's query; else one of this session's
queries (or any job id) read in the minibuffer."
  (interactive (list (rlm--read-job-id)))
  (let* ((res (rlm-request 'query/trace (list :job job-id)))
         (records (append (plist-get res :records) nil))
         (buf (get-buffer-create (format "*rlm trace: %s*" job-id))))
    (with-current-buffer buf
      (let ((inhibit-read-only t))
        (erase-buffer)
        (rlm-trace-mode)
        (insert (propertize (format "Trace of %s (%d records)\n" job-id (length records))
                            'face 'rlm-heading))
        (dolist (rec records)
          (rlm--insert-trace-record rec))
        (goto-char (point-min))
        (outline-hide-body)
        (set-buffer-modified-p nil)))
    (display-buffer buf rlm-display-buffer-action)
    buf))

;;;; Contexts list

(defvar rlm-contexts-mode-map
  (let ((map (make-sparse-keymap)))
    (define-key map (kbd "RET") #'rlm-contexts-peek)
    (define-key map (kbd "v") #'rlm-contexts-peek)
    (define-key map (kbd "s") #'rlm-contexts-search)
    (define-key map (kbd "d") #'rlm-contexts-drop)
    (define-key map (kbd "a") #'rlm-contexts-query)
    (define-key map (kbd "+") #'rlm-contexts-add-files)
    map)
  "Keymap of `rlm-contexts-mode'.")

(defun rlm--time-string (v)
  "Format V, seconds since the epoch or a string, as a time."
  (cond ((numberp v) (format-time-string "%F %T" (seconds-to-time v)))
        ((stringp v)
         (condition-case nil
             (format-time-string "%F %T" (parse-iso8601-time-string v))
           (error v)))
        (t "")))

(defun rlm--sort-by (key)
  "Return a predicate sorting tabulated entries by KEY of their data."
  (lambda (a b)
    (< (or (plist-get (car a) key) 0) (or (plist-get (car b) key) 0))))

(define-derived-mode rlm-contexts-mode tabulated-list-mode "rlm-contexts"
  "Major mode listing the daemon's contexts.
\\{rlm-contexts-mode-map}"
  (setq tabulated-list-format
        (vector '("Name" 44 t)
                (list "Size" 10 (rlm--sort-by :bytes) :right-align t)
                (list "Tokens" 9 (rlm--sort-by :tokens_est) :right-align t)
                '("Updated" 20 t)))
  (setq tabulated-list-sort-key '("Name" . nil))
  (setq tabulated-list-padding 1)
  (add-hook 'tabulated-list-revert-hook #'rlm--contexts-refresh nil t)
  (tabulated-list-init-header))

(defun rlm--contexts-refresh ()
  "Fetch the contexts from the daemon into this buffer."
  (setq tabulated-list-entries
        (mapcar (lambda (c)
                  (list c
                        (vector (plist-get c :name)
                                (file-size-human-readable (or (plist-get c :bytes) 0))
                                (rlm--format-count (plist-get c :tokens_est))
                                (rlm--time-string (plist-get c :updated)))))
                (append (rlm-request 'context/list) nil))))

;;;###autoload
(defun rlm-contexts ()
  "List the daemon's contexts.
\\<rlm-contexts-mode-map>\\[rlm-contexts-peek] peeks, \\[rlm-contexts-search] searches, \
\\[rlm-contexts-drop] drops, \\[rlm-contexts-query] asks a question."
  (interactive)
  (let ((buf (get-buffer-create "*rlm contexts*")))
    (with-current-buffer buf
      (rlm-contexts-mode)
      (rlm--contexts-refresh)
      (tabulated-list-print))
    (pop-to-buffer buf)
    buf))

(defun rlm--contexts-name ()
  "Return the name of the context at point."
  (or (plist-get (tabulated-list-get-id) :name)
      (user-error "No context on this line")))

(defun rlm-peek (name &optional start end)
  "Show the text of context NAME from START to END in a buffer."
  (interactive (list (rlm--read-context "Peek at context: ")))
  (let* ((start (or start 0))
         (end (or end (+ start rlm-peek-chars)))
         (text (plist-get (rlm-request 'context/peek (list :name name :start start :end end))
                          :text))
         (buf (get-buffer-create (format "*rlm peek: %s*" name))))
    (with-current-buffer buf
      (let ((inhibit-read-only t))
        (erase-buffer)
        (insert text)
        (when (>= (length text) (- end start))
          (insert (propertize (format "\n[… characters %d-%d shown]\n" start end)
                              'face 'shadow)))
        (goto-char (point-min))
        (special-mode)
        (set-buffer-modified-p nil)))
    (pop-to-buffer buf)
    buf))

(defun rlm-contexts-peek (&optional arg)
  "Peek at the context at point; with ARG, read the character range."
  (interactive "P")
  (let ((name (rlm--contexts-name)))
    (if arg
        (rlm-peek name (read-number "Start: " 0) (read-number "End: " rlm-peek-chars))
      (rlm-peek name))))

(defun rlm-search (name pattern)
  "Show the matches of PATTERN (a Python regexp) in context NAME."
  (interactive (list (rlm--read-context "Search context: ")
                     (read-string "Python regexp: ")))
  (let* ((res (rlm-request 'context/search (list :name name :pattern pattern)))
         (matches (append (plist-get res :matches) nil))
         (buf (get-buffer-create (format "*rlm search: %s*" name))))
    (with-current-buffer buf
      (let ((inhibit-read-only t))
        (erase-buffer)
        (insert (format "%d match%s of /%s/ in %s\n\n" (length matches)
                        (if (= (length matches) 1) "" "es") pattern name))
        (dolist (m matches)
          (insert (propertize (format "%6d: " (plist-get m :line)) 'face 'rlm-label)
                  (rlm--truncate (or (plist-get m :text) "") 200) "\n"))
        (goto-char (point-min))
        (special-mode)
        (set-buffer-modified-p nil)))
    (pop-to-buffer buf)
    matches))

(defun rlm-contexts-search (pattern)
  "Search the context at point for PATTERN."
  (interactive (list (read-string "Python regexp: ")))
  (rlm-search (rlm--contexts-name) pattern))

(defun rlm-drop (name)
  "Drop the daemon's context NAME."
  (interactive (list (rlm--read-context "Drop context: ")))
  (plist-get (rlm-request 'context/drop (list :name name)) :dropped))

(defun rlm-contexts-drop ()
  "Drop the context at point, after confirmation."
  (interactive)
  (let ((name (rlm--contexts-name)))
    (when (yes-or-no-p (format "Drop context %s? " name))
      (rlm-drop name)
      (revert-buffer))))

(defun rlm-contexts-query (question)
  "Ask QUESTION about the context at point."
  (interactive (list (rlm--read-question)))
  (rlm-query-context question (rlm--contexts-name)))

(defun rlm-contexts-add-files (files)
  "Have the daemon read FILES into a new context, then refresh."
  (interactive (list (rlm--read-files)))
  (rlm-files-context files)
  (revert-buffer))

;;;; Diff review

(defvar-local rlm--diff-source nil
  "The buffer holding the diff a review refers to.")

(defun rlm--diff-files (diff-buffer)
  "Return the file names (new side) in the unified diff of DIFF-BUFFER."
  (with-current-buffer diff-buffer
    (save-excursion
      (goto-char (point-min))
      (let (files)
        (while (re-search-forward "^\\+\\+\\+ \\(?:b/\\)?\\([^\t\n]+\\)" nil t)
          (unless (equal (match-string 1) "/dev/null")
            (push (match-string-no-properties 1) files)))
        (nreverse files)))))

(defun rlm-diff-line-position (diff-buffer file line)
  "Return the position in DIFF-BUFFER of new-file LINE of FILE.
LINE is a line of the new version; when no hunk covers it, return
the position of FILE's header, and nil when FILE is not in the diff."
  (with-current-buffer diff-buffer
    (save-excursion
      (goto-char (point-min))
      (when (re-search-forward
             (concat "^\\+\\+\\+ \\(?:b/\\)?" (regexp-quote file) "\\(?:\t.*\\)?$") nil t)
        (let ((header (line-beginning-position))
              (limit (save-excursion
                       (if (re-search-forward "^\\(?:diff \\|--- \\)" nil t)
                           (line-beginning-position) (point-max))))
              found)
          (while (and (not found)
                      (re-search-forward "^@@ -[0-9,]+ \\+\\([0-9]+\\)\\(?:,\\([0-9]+\\)\\)? @@"
                                         limit t))
            (let ((new (string-to-number (match-string 1))))
              (forward-line 1)
              (while (and (not found) (< (point) limit)
                          (not (looking-at "^@@")))
                (let ((c (char-after)))
                  (cond ((memq c '(?\s ?+))
                         (if (= new line) (setq found (point))
                           (setq new (1+ new))))
                        ((eq c ?-) nil)))
                (unless found (forward-line 1)))))
          (or found header))))))

(defun rlm--link-references (job diff-buffer)
  "Make the path:line references in JOB's answer buttons into DIFF-BUFFER."
  (let ((files (rlm--diff-files diff-buffer))
        (buf (rlm-job-buffer job)))
    (when (and files (buffer-live-p buf))
      (with-current-buffer buf
        (setq rlm--diff-source diff-buffer)
        (let ((inhibit-read-only t))
          (save-excursion
            (goto-char (point-min))
            (while (re-search-forward
                    "\\(?:[ab]/\\)?\\([[:alnum:]_.][[:alnum:]_./+-]*\\):\\([0-9]+\\)" nil t)
              (let* ((ref (match-string-no-properties 1))
                     (line (string-to-number (match-string 2)))
                     (file (or (car (member ref files))
                               (cl-find-if (lambda (f) (string-suffix-p (concat "/" ref) f))
                                           files))))
                (when (and file (get-text-property (match-beginning 0) 'rlm-answer))
                  (make-text-button (match-beginning 0) (match-end 0)
                                    'rlm-file file 'rlm-line line
                                    'rlm-diff diff-buffer
                                    'help-echo (format "Jump to %s:%d in the diff" file line)
                                    'action #'rlm--jump-to-reference))))))))))

(defun rlm--jump-to-reference (button)
  "Show the diff line BUTTON refers to."
  (let ((diff (button-get button 'rlm-diff)))
    (unless (buffer-live-p diff) (user-error "The diff buffer is gone"))
    (let ((pos (rlm-diff-line-position diff (button-get button 'rlm-file)
                                       (button-get button 'rlm-line))))
      (pop-to-buffer diff)
      (when pos (goto-char pos)))))

(defun rlm-review (diff-buffer &optional description question)
  "Review the unified diff in DIFF-BUFFER; return the `rlm-job'.
DESCRIPTION names the diff in the result buffer; QUESTION defaults
to `rlm-review-question'.  When the review arrives, its path:line
references become buttons that jump to the diff."
  (let* ((name (rlm-buffer-context diff-buffer)))
    (rlm-start-query (or question rlm-review-question)
                     :context name
                     :description (or description (format "diff %s" (buffer-name diff-buffer)))
                     :buffer-name (format "*rlm review: %s*" (or description (buffer-name diff-buffer)))
                     :callback (lambda (job)
                                 (when (eq (rlm-job-state job) 'done)
                                   (rlm--link-references job diff-buffer))))))

;;;###autoload
(defun rlm-review-diff (&optional question)
  "Review the diff in this `diff-mode' buffer.
With a prefix argument, read the QUESTION instead of using
`rlm-review-question'."
  (interactive (list (and current-prefix-arg (rlm--read-question))))
  (unless (derived-mode-p 'diff-mode) (user-error "Not in a diff buffer"))
  (rlm-review (current-buffer) nil question))

(provide 'rlm)
;;; rlm.el ends here
